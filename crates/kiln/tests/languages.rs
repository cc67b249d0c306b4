//! JavaScript, TypeScript and bash sessions, end to end: a real server with
//! the `full` runtime, real Deno and bash kernels in real sandboxes, over
//! HTTP. The seed examples in each language; errors, time limits and
//! interrupts; a session keeping its language; files; how outputs map onto
//! the TCI types; streaming; and the attack cases that apply, run from
//! JavaScript and bash.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start, text_of, types_of, KEY};
use serde_json::{json, Value};

/// Run `code` in `language` (in `session` when given); the request must
/// succeed. Returns `data`.
async fn run(s: &common::Server, language: &str, code: &str, session: Option<&str>) -> Value {
    let (status, v) = post(s, language, code, session, None).await;
    assert_eq!(status, 200, "{language}: {code}: {v}");
    v["data"].clone()
}

async fn post(
    s: &common::Server,
    language: &str,
    code: &str,
    session: Option<&str>,
    timeout: Option<f64>,
) -> (u16, Value) {
    let mut body = json!({"language": language, "code": code});
    if let Some(id) = session {
        body["session_id"] = json!(id);
    }
    if let Some(t) = timeout {
        body["timeout"] = json!(t);
    }
    s.post("/v1/tci/execute", Some(KEY), body).await
}

fn session_of(d: &Value) -> String {
    d["session_id"].as_str().unwrap().to_string()
}

/// The seeds' examples (hello, state across calls, an uploaded script run
/// by the session), in each language.
#[tokio::test(flavor = "multi_thread")]
async fn the_seed_examples_run_in_javascript_typescript_and_bash() {
    let s = start(&["--profile", "full"]);
    let (_, v) = s.raw(reqwest::Method::GET, "/v1/tci/languages", None, Vec::new()).await;
    assert_eq!(v["data"], json!({"languages": ["python", "javascript", "typescript", "bash"], "default": "python"}));

    struct Seeds {
        language: &'static str,
        hello: &'static str,
        set: &'static str,
        get: &'static str,
        script: (&'static str, &'static str),
        run_script: &'static str,
    }
    let all = [
        Seeds {
            language: "javascript",
            hello: r#"console.log("Welcome to Together Code Interpreter!")"#,
            set: "var x = 42",
            get: "console.log(`The value of x is ${x}`)",
            script: ("myscript.js", "console.log(`Hello from inside ${import.meta.url.split('/').pop()}!`)"),
            run_script: "await import('./myscript.js')",
        },
        Seeds {
            language: "typescript",
            hello: r#"const greeting: string = "Welcome to Together Code Interpreter!"; console.log(greeting)"#,
            set: "let x: number = 42",
            get: "console.log(`The value of x is ${x}`)",
            script: (
                "myscript.ts",
                "const name: string = import.meta.url.split('/').pop()!; console.log(`Hello from inside ${name}!`)",
            ),
            run_script: "await import('./myscript.ts')",
        },
        Seeds {
            language: "bash",
            hello: r#"echo "Welcome to Together Code Interpreter!""#,
            set: "x=42",
            get: r#"echo "The value of x is $x""#,
            script: ("myscript.sh", "echo \"Hello from inside $(basename \"$0\")!\""),
            run_script: "bash myscript.sh",
        },
    ];
    for seed in all {
        let lang = seed.language;
        let d = run(&s, lang, seed.hello, None).await;
        assert_eq!(
            (d["status"].as_str(), text_of(&d, "stdout")),
            (Some("success"), "Welcome to Together Code Interpreter!\n".into()),
            "{lang}: {d}"
        );

        let first = run(&s, lang, seed.set, None).await;
        let id = session_of(&first);
        let d = run(&s, lang, seed.get, Some(&id)).await;
        assert_eq!(text_of(&d, "stdout"), "The value of x is 42\n", "{lang}: {d}");

        let (name, content) = seed.script;
        let body = json!({
            "language": lang,
            "code": seed.run_script,
            "files": [{"name": name, "encoding": "string", "content": content}],
        });
        let (status, v) = s.post("/tci/execute", Some(KEY), body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(text_of(&v["data"], "stdout"), format!("Hello from inside {name}!\n"), "{lang}: {v}");

        // The same through `kiln exec --language`, which streams as it prints.
        let url = s.url.clone();
        let hello = seed.hello.to_string();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(["exec", "--language", lang, &hello, "--url", &url, "--api-key", KEY])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{lang}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "Welcome to Together Code Interpreter!\n", "{lang}: {out:?}");
    }
}

/// What each language shows when the code fails, runs too long, or is
/// interrupted: an `error` output with the cause, a 200, and the session
/// (with its state) still there.
#[tokio::test(flavor = "multi_thread")]
async fn errors_time_limits_and_interrupts_in_every_language_keep_the_session() {
    let s = start(&["--profile", "full"]);
    // JavaScript: a thrown error is an `error` with its stack.
    let d = run(&s, "javascript", "var kept = 7;\nfunction f() { throw new TypeError('boom') }\nf()", None).await;
    let id = session_of(&d);
    assert_eq!(d["status"], "error", "{d}");
    let err = text_of(&d, "error");
    assert!(err.starts_with("TypeError: boom") && err.contains("at f (") && err.contains("at <anonymous>"), "{d}");
    // A busy loop is interrupted at the limit; the variables stay.
    let (status, v) = post(&s, "javascript", "while (true) {}", Some(&id), Some(1.5)).await;
    assert_eq!(status, 200, "{v}");
    let err = text_of(&v["data"], "error");
    assert!(err.contains("time limit") && err.contains("state is kept"), "{v}");
    let d = run(&s, "javascript", "console.log(kept)", Some(&id)).await;
    assert_eq!(text_of(&d, "stdout"), "7\n", "{d}");
    // A cell that never settles cannot be interrupted in Deno: it is killed
    // after the grace period and the kernel restarted, files kept.
    let (status, v) = post(
        &s,
        "javascript",
        "Deno.writeTextFileSync('kept.txt', 'yes'); await new Promise(() => {})",
        Some(&id),
        Some(1.0),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let err = text_of(&v["data"], "error");
    assert!(err.contains("time limit"), "{v}");
    let d = run(&s, "javascript", "console.log(Deno.readTextFileSync('kept.txt'))", Some(&id)).await;
    assert_eq!(text_of(&d, "stdout"), "yes\n", "the restarted kernel runs in the same work dir: {d}");

    // TypeScript: types are stripped, not checked (as in a Deno notebook).
    // A syntax error, which Deno's kernel reports only in its reply, is an
    // error too, and the session goes on.
    let d = run(&s, "typescript", "const n: number = 1;\nn + 1", None).await;
    assert_eq!(d["outputs"], json!([{"type": "execute_result", "data": {"text/plain": "2"}}]), "{d}");
    let id = session_of(&d);
    let d = run(&s, "typescript", "let = ;", Some(&id)).await;
    assert_eq!(d["status"], "error", "{d}");
    assert_eq!(types_of(&d), ["error"], "{d}");
    let d = run(&s, "typescript", "n * 10", Some(&id)).await;
    assert_eq!(d["outputs"][0]["data"]["text/plain"], "10", "{d}");

    // bash: a failing command is an error; `sleep` is interrupted at the
    // limit and the shell's variables stay.
    let d = run(&s, "bash", "kept=9\nls /no/such/dir", None).await;
    let id = session_of(&d);
    assert_eq!(d["status"], "error", "{d}");
    assert!(text_of(&d, "stdout").contains("No such file or directory"), "{d}");
    let (status, v) = post(&s, "bash", "echo before; sleep 30; echo after", Some(&id), Some(1.5)).await;
    assert_eq!(status, 200, "{v}");
    let out = text_of(&v["data"], "stdout");
    assert!(out.contains("before") && !out.contains("after"), "{v}");
    assert!(text_of(&v["data"], "error").contains("time limit"), "{v}");
    let d = run(&s, "bash", "echo $kept", Some(&id)).await;
    assert_eq!(text_of(&d, "stdout"), "9\n", "{d}");
}

/// A session runs the language it started with; other languages need a new
/// session, and names the server does not run are refused up front.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_keeps_its_language_and_unknown_languages_are_refused() {
    let s = start(&["--profile", "full"]);
    // JavaScript's pool starts empty: the first session boots its own
    // kernel, and the pool grows by that demand (bash's stays empty).
    let pools = || async {
        let text = s.metrics().await;
        ["python", "javascript", "bash"].map(|l| {
            common::metric(&text, &format!("kiln_pool_ready_by_language{{language=\"{l}\"}}")).map(|n| n as u64)
        })
    };
    assert_eq!(pools().await[1], Some(0));
    let d = run(&s, "javascript", "const a = 1", None).await;
    let id = session_of(&d);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while pools().await[1] != Some(1) {
        assert!(std::time::Instant::now() < deadline, "JavaScript's pool did not grow: {:?}", pools().await);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(pools().await[2], Some(0), "bash's pool grew without demand");
    for other in ["python", "typescript", "bash"] {
        let (status, v) = post(&s, other, "1", Some(&id), None).await;
        assert_eq!((status, v["errors"][0]["code"].as_str()), (409, Some("language_mismatch")), "{other}: {v}");
        let msg = v["errors"][0]["message"].as_str().unwrap();
        assert!(msg.contains("runs javascript") && msg.contains(other), "{msg}");
    }
    // The refusals cost the session nothing.
    let d = run(&s, "javascript", "a + 1", Some(&id)).await;
    assert_eq!(d["outputs"][0]["data"]["text/plain"], "2", "{d}");
    for bad in ["", "JavaScript", "ruby"] {
        let (status, v) = post(&s, bad, "1", None, None).await;
        assert_eq!((status, v["errors"][0]["code"].as_str()), (400, Some("unsupported_language")), "{bad}: {v}");
    }
    // The OpenAPI document's `language` is exactly what this server runs.
    let (_, doc) = s.raw(reqwest::Method::GET, "/openapi.json", None, Vec::new()).await;
    assert_eq!(doc["components"]["schemas"]["Language"]["enum"], json!(["python", "javascript", "typescript", "bash"]));

    // A `minimal` server runs Python alone, and says so.
    let m = start(&["--profile", "minimal"]);
    let (_, v) = m.raw(reqwest::Method::GET, "/v1/tci/languages", None, Vec::new()).await;
    assert_eq!(v["data"]["languages"], json!(["python"]));
    let (status, v) = post(&m, "javascript", "1", None, None).await;
    assert_eq!((status, v["errors"][0]["code"].as_str()), (400, Some("unsupported_language")), "{v}");
    let (_, doc) = m.raw(reqwest::Method::GET, "/openapi.json", None, Vec::new()).await;
    assert_eq!(doc["components"]["schemas"]["Language"]["enum"], json!(["python"]));
}

/// A file a bash session writes is in the session's files, and one
/// uploaded through the files endpoint is seen by bash.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_written_in_bash_is_read_back_through_the_files_endpoint() {
    let s = start(&["--profile", "full"]);
    let d = run(
        &s,
        "bash",
        "mkdir -p out && seq 1 3 > out/n.txt && printf 'caf\\xc3\\xa9' > out/u.txt && wc -l < out/n.txt",
        None,
    )
    .await;
    assert_eq!(text_of(&d, "stdout").trim(), "3", "{d}");
    let id = session_of(&d);
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/tci/sessions/{id}/files/out/n.txt", s.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"1\n2\n3\n");
    let (status, v) =
        s.raw(reqwest::Method::GET, &format!("/v1/tci/sessions/{id}/files?path=out"), Some(KEY), Vec::new()).await;
    assert_eq!(status, 200, "{v}");
    let names: Vec<&str> =
        v["data"]["entries"].as_array().map_or(vec![], |a| a.iter().filter_map(|f| f["name"].as_str()).collect());
    assert!(names.contains(&"n.txt") && names.contains(&"u.txt"), "{v}");
    // The other way: uploaded, then read by bash.
    let up = json!({"files": [{"name": "in.txt", "encoding": "string", "content": "from the API"}]});
    let (status, v) = s.post(&format!("/v1/tci/sessions/{id}/files"), Some(KEY), up).await;
    assert_eq!(status, 200, "{v}");
    let d = run(&s, "bash", "cat in.txt; echo; cat out/u.txt", Some(&id)).await;
    // bash_kernel ends the output at the prompt with a newline.
    assert_eq!(text_of(&d, "stdout"), "from the API\ncafé\n", "{d}");
}

/// console.log → stdout, console.error → stderr, the last value →
/// execute_result, Deno's display → display_data (HTML, SVG, PNG), in the
/// order produced; the same when streamed.
#[tokio::test(flavor = "multi_thread")]
async fn javascript_outputs_map_onto_the_tci_output_types() {
    let s = start(&["--profile", "full"]);
    let code = r#"console.log("out 1");
console.error("err 1");
Deno.jupyter.display({"text/html": "<b>bold</b>", "text/plain": "bold"}, {raw: true});
await Deno.jupyter.display(Deno.jupyter.svg`<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"/>`);
console.log("out 2");
({answer: 42})"#;
    let d = run(&s, "javascript", code, None).await;
    assert_eq!(d["status"], "success", "{d}");
    assert_eq!(types_of(&d), ["stdout", "stderr", "display_data", "display_data", "stdout", "execute_result"], "{d}");
    let outs = d["outputs"].as_array().unwrap();
    assert_eq!(outs[0]["data"], "out 1\n");
    assert_eq!(outs[1]["data"], "err 1\n");
    assert_eq!(outs[2]["data"], json!({"text/html": "<b>bold</b>", "text/plain": "bold"}));
    assert!(outs[3]["data"]["image/svg+xml"].as_str().unwrap().contains("<svg"), "{d}");
    assert_eq!(outs[5]["data"]["text/plain"], "{ answer: 42 }", "{d}");
    // An HTML value as the cell's result, and a PNG through display.
    let id = session_of(&d);
    let d = run(&s, "javascript", "Deno.jupyter.html`<p>hi</p>`", Some(&id)).await;
    assert_eq!(d["outputs"], json!([{"type": "execute_result", "data": {"text/html": "<p>hi</p>"}}]), "{d}");
    let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
    let d = run(
        &s,
        "javascript",
        &format!("Deno.jupyter.display({{'image/png': '{png}'}}, {{raw: true}}); void 0"),
        Some(&id),
    )
    .await;
    assert_eq!(d["outputs"], json!([{"type": "display_data", "data": {"image/png": png}}]), "{d}");
    // Many quick prints arrive complete and in order (Deno publishes them
    // from a queue that races the end of the cell: kiln fences it).
    for _ in 0..5 {
        let d = run(&s, "javascript", "for (let i = 0; i < 200; i++) console.log(i)", Some(&id)).await;
        let want: String = (0..200).map(|i| format!("{i}\n")).collect();
        assert_eq!(text_of(&d, "stdout"), want);
    }

    // Streamed: the same outputs as events, and `done` equal to a plain call.
    let body = json!({"language": "javascript", "code": "console.log('a'); console.error('b'); 1 + 1", "stream": true});
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/tci/execute", s.url))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(events, ["session", "stdout", "stderr", "execute_result", "done"], "{text}");
    let done = text.lines().skip_while(|l| *l != "event: done").nth(1).and_then(|l| l.strip_prefix("data: ")).unwrap();
    let done: Value = serde_json::from_str(done).unwrap();
    assert_eq!(
        done["data"]["outputs"],
        json!([{"type": "stdout", "data": "a\n"}, {"type": "stderr", "data": "b\n"}, {"type": "execute_result", "data": {"text/plain": "2"}}])
    );
}

/// What hostile code tries from JavaScript and bash meets the same walls
/// as from Python: the host's files are not there, there is no network
/// without a policy, the kernel runs as an unprivileged user, and a fork
/// bomb is bounded by the session's process limit.
#[tokio::test(flavor = "multi_thread")]
async fn javascript_and_bash_sessions_meet_the_same_sandbox_walls() {
    let s = start(&["--profile", "full", "--network", "none", "--pids-limit", "128"]);
    let data_dir = s.sessions_dir();
    let host_path = data_dir.parent().unwrap().display().to_string();
    // JavaScript.
    let code = format!(
        r#"const tries = {{}};
for (const p of ["/etc/shadow", "/proc/1/root/etc/hostname", "/root/.cargo"]) {{
  try {{ Deno.statSync(p); tries[p] = "visible"; }} catch (e) {{ tries[p] = e.name; }}
}}
for (const p of ["{host_path}"]) {{
  try {{ tries[p] = [...Deno.readDirSync(p)].length ? "visible" : "empty"; }} catch (e) {{ tries[p] = e.name; }}
}}
try {{ await fetch("https://registry.npmjs.org/"); tries.fetch = "reached"; }} catch (e) {{ tries.fetch = e.name; }}
try {{ const c = await Deno.connect({{hostname: "1.1.1.1", port: 443}}); c.close(); tries.connect = "reached"; }} catch (e) {{ tries.connect = e.name; }}
const id = new Deno.Command("id", {{args: ["-u"]}}).outputSync();
tries.uid = new TextDecoder().decode(id.stdout).trim();
console.log(JSON.stringify(tries));"#
    );
    let d = run(&s, "javascript", &code, None).await;
    let line = text_of(&d, "stdout");
    let tries: Value = serde_json::from_str(line.trim()).unwrap_or_else(|_| panic!("{d}"));
    for p in ["/etc/shadow", "/root/.cargo", host_path.as_str(), "/proc/1/root/etc/hostname"] {
        assert_ne!(tries[p], "visible", "{p} is visible from JavaScript: {tries}");
    }
    assert_ne!(tries["fetch"], "reached", "{tries}");
    assert_ne!(tries["connect"], "reached", "{tries}");
    assert_eq!(tries["uid"], "1000", "{tries}");

    // bash: the same, and a fork bomb.
    let code = format!(
        "[ -e /etc/shadow ] && echo visible shadow\n\
         [ -e /root/.cargo ] && echo visible cargo\n\
         for p in {host_path}; do [ -n \"$(ls -A \"$p\" 2>/dev/null)\" ] && echo \"visible $p\"; done\n\
         (exec 3<>/dev/tcp/1.1.1.1/443) 2>/dev/null && echo reached\n\
         id -u"
    );
    let d = run(&s, "bash", &code, None).await;
    let out = text_of(&d, "stdout");
    assert!(!out.contains("visible") && !out.contains("reached"), "{d}");
    assert!(out.trim_end().ends_with("1000"), "{d}");
    let id = session_of(&d);
    let (status, v) =
        post(&s, "bash", "bomb() { bomb | bomb & }; bomb; sleep 3; echo survived", Some(&id), Some(10.0)).await;
    assert_eq!(status, 200, "{v}");
    // The server and other sessions are fine, and so is a new session.
    let d = run(&s, "bash", "echo fine", None).await;
    assert_eq!(text_of(&d, "stdout"), "fine\n", "{d}");
    let d = s.exec("print('python fine')", None).await;
    assert_eq!(text_of(&d, "stdout"), "python fine\n", "{d}");
}

/// `npm:` imports go through the session's network policy: under
/// `registries`, Deno reaches the registry this host's npm is configured for
/// (a stand-in, named by `npm_config_registry` in kiln's environment, on
/// "the internet" of a network namespace this test creates) and no other
/// host; under `none`, nothing at all. The stand-in speaks no TLS, so the
/// import itself fails (Deno loads a cell's imports before running it, and
/// retries a failing registry for minutes: the cell's time limit ends it):
/// what is checked is where connections arrive.
#[tokio::test(flavor = "multi_thread")]
async fn npm_imports_reach_the_configured_registry_only_under_the_registries_policy() {
    let mut net = common::inet::Net::new(2);
    net.listen_on_internet("registry", 443);
    let s = net.kiln_with_env(
        &["--profile", "full", "--network", "registries"],
        &["npm_config_registry=https://npm-registry.test/"],
    );
    let import = r#"import leftPad from "npm:left-pad@1.3.0";"#;
    let (st, v) = post(&s, "javascript", import, None, Some(15.0)).await;
    assert_eq!(st, 200, "{v}");
    let d = &v["data"];
    assert_eq!(d["status"], "error", "{d}");
    let reached = net.connections("registry");
    assert!(reached >= 1, "the npm registry was not reached through the proxy");
    // Any other host, same address and port: refused by the proxy.
    let id = session_of(d);
    let other =
        r#"try { await fetch("https://internet.test/"); console.log("reached"); } catch (e) { console.log(e.name); }"#;
    let d = run(&s, "javascript", other, Some(&id)).await;
    assert_eq!(text_of(&d, "stdout"), "TypeError\n", "{d}");
    assert_eq!(net.connections("registry"), reached, "a host outside the policy was reached");

    // A key whose policy is `none`: no proxy, no connection.
    let (st, v) = s.post("/v1/admin/keys", Some(KEY), json!({"label": "offline", "network": "none"})).await;
    assert_eq!(st, 200, "{v}");
    let offline = v["data"]["key"].as_str().unwrap().to_string();
    let body = json!({"language": "javascript", "code": import, "timeout": 15});
    let (st, v) = s.post("/v1/tci/execute", Some(&offline), body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"]["status"], "error", "{v}");
    assert_eq!(net.connections("registry"), reached, "a session under `none` reached the registry");
}

/// A Deno program that waits a second, says whether `bg.txt` is in
/// `/work`, then leaves a process behind that writes it.
const LEAVES_A_WRITER: &str = "import { existsSync } from 'node:fs';\n\
    await new Promise((r) => setTimeout(r, 1000));\n\
    console.log(existsSync('bg.txt') ? 'dirty' : 'clean');\n\
    new Deno.Command('bash', { args: ['-c', 'sleep 0.3; echo x > bg.txt'] }).spawn().unref();";

/// A Deno program that prints the command name of its parent's parent: the
/// kernel that started the judge (`deno`) when the item's own session runs
/// its tests, something else when a Python kernel does.
const GRANDPARENT: &str =
    "const parent = (pid) => Deno.readTextFileSync(`/proc/${pid}/stat`).split(') ')[1].split(' ')[1];\n\
    console.log(Deno.readTextFileSync(`/proc/${parent(Deno.ppid)}/comm`).trim());";

/// A batch item in JavaScript, TypeScript or bash is scored by program
/// tests, as a Python one: kiln's judge runs the item's code with the
/// language's interpreter once per test, from the same `/work`, and a test
/// can reach neither the judge nor the kernel. Assertions stay Python's.
/// Both ways the judge runs: from a Python kernel (a program-only item in
/// a fresh session, which needs no kernel of its language), and as a
/// process the item's own Deno or bash kernel starts (a kept session).
#[tokio::test(flavor = "multi_thread")]
async fn program_tests_score_javascript_typescript_and_bash_items() {
    let s = start(&["--profile", "full"]);
    let double_js = "import { readFileSync } from 'node:fs';\nconsole.log(Number(readFileSync(0, 'utf8')) * 2);";
    let double_ts =
        "const text: string = await new Response(Deno.stdin.readable).text();\nconsole.log(Number(text) * 2);";
    let tests = json!([{"stdin": "2\n", "expected_stdout": "4\n"}, {"stdin": "5\n", "expected_stdout": "10"}]);
    // Each run finds /work as the item left it, whatever the run before did.
    let once = "import { existsSync, writeFileSync } from 'node:fs';\n\
                console.log(existsSync('left.txt') ? 'dirty' : 'clean');\nwriteFileSync('left.txt', 'x');";
    let clean_twice = json!([{"stdin": "", "expected_stdout": "clean"}, {"stdin": "", "expected_stdout": "clean"}]);
    let items = json!([
        {"language": "javascript", "code": double_js, "tests": tests},
        {"language": "typescript", "code": double_ts, "tests": tests},
        {"language": "bash", "code": "read n\necho $((n * 2))", "tests": tests},
        {"language": "bash", "code": "read n\necho $((n * 3))", "tests": tests},
        // Prints the right answer, then fails: a failed run.
        {"language": "javascript", "code": "console.log('4');\nDeno.exit(1);", "tests": [tests[0]]},
        {"language": "javascript", "code": once, "tests": clean_twice},
        // A test that tries to end the judge and the kernel: refused, and
        // the next test runs as usual.
        {"language": "bash", "code": "kill -9 $PPID\nkill -9 -1\nread n\necho $((n * 2))", "tests": tests},
        // What a run leaves running is killed before the next run.
        {"language": "javascript", "code": LEAVES_A_WRITER, "tests": clean_twice},
        {"language": "javascript", "code": "while (true) {}", "tests": [tests[0]], "tests_timeout": 2},
        // Programs larger than a command-line argument may be.
        {"language": "javascript", "code": format!("// {}\n{double_js}", "x".repeat(300_000)), "tests": tests},
        {"language": "bash", "code": format!("# {}\nread n\necho $((n * 2))", "x".repeat(300_000)), "tests": tests},
        {"language": "javascript", "code": GRANDPARENT, "tests": [{"stdin": "", "expected_stdout": "deno"}]},
    ]);
    for keep in [false, true] {
        let mut items = items.clone();
        for item in items.as_array_mut().unwrap() {
            item["keep_session"] = json!(keep);
        }
        let (status, v) = s.post("/v1/tci/batch", Some(KEY), json!({ "items": items })).await;
        assert_eq!(status, 200, "{v}");
        let results = v["data"]["results"].as_array().unwrap();
        let passed: Vec<Vec<bool>> = results
            .iter()
            .map(|r| r["tests"].as_array().unwrap().iter().map(|t| t["passed"].as_bool().unwrap()).collect())
            .collect();
        let expect = [
            vec![true, true],
            vec![true, true],
            vec![true, true],
            vec![false, false],
            vec![false],
            vec![true, true],
            vec![true, true],
            vec![true, true],
            vec![false],
            vec![true, true],
            vec![true, true],
            // The item's own Deno kernel started the judge only when kept.
            vec![keep],
        ];
        assert_eq!(passed, expect, "kept: {keep}: {v:#}");
        assert_eq!(results[3]["tests"][1]["stdout"], "15\n");
        assert_eq!(results[4]["tests"][0]["status"], "error", "{}", results[4]);
        assert_eq!(results[8]["tests"][0]["status"], "timeout", "{}", results[8]);
        assert!(
            results[6]["tests"][0]["stderr"].as_str().unwrap().contains("Operation not permitted"),
            "{}",
            results[6]
        );
        // Fresh sessions ended with their items; kept ones live on, each
        // in its item's language.
        let live = s.sessions(KEY).await;
        assert_eq!(live.len(), if keep { results.len() } else { 0 }, "{live:?}");
        if keep {
            let id = results[2]["session_id"].as_str().unwrap();
            let (_, v) = s
                .post("/v1/tci/execute", Some(KEY), json!({"code": "echo $0", "language": "bash", "session_id": id}))
                .await;
            assert_eq!(v["data"]["status"], "success", "{v}");
            for r in results {
                let path = format!("/v1/tci/sessions/{}", r["session_id"].as_str().unwrap());
                let (status, _) = s.raw(reqwest::Method::DELETE, &path, Some(KEY), Vec::new()).await;
                assert!(status < 300, "{path}: {status}");
            }
        }
    }

    // An item must speak its named session's language: refused before
    // anything runs, never an item that fails (or blames kiln) later.
    let python = s.exec("x = 1", None).await["session_id"].as_str().unwrap().to_string();
    let item = json!({"language": "javascript", "code": "1", "session_id": python, "tests": [tests[0]]});
    let (status, v) = s.post("/v1/tci/batch", Some(KEY), json!({ "items": [{"code": "1"}, item] })).await;
    assert_eq!((status, v["error"]["param"].as_str()), (409, Some("items[1].language")), "{v}");
    assert_eq!(v["error"]["code"], "language_mismatch", "{v}");

    // An assertion needs Python's namespace: refused before anything runs.
    let item = json!({"language": "javascript", "code": "const a = 1", "tests": [tests[0], {"code": "a === 1"}]});
    let (status, v) = s.post("/v1/tci/batch", Some(KEY), json!({ "items": [item] })).await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("items[0].tests[1]")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("Python items only"), "{v}");
}
