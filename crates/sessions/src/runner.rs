//! The cell that runs some of a batch item's tests in its session, in the
//! session's own language.
//!
//! The tests are run by kiln's judge (`kiln_kernel.judge`, Python), which
//! prints one report line per test for [`crate::scoring`] to read. In a
//! Python session the judge is already in the kernel: the cell calls it,
//! and each test is a fork of the kernel, or in a batch's lane a fork of
//! the kernel's lean fork server (`kiln_kernel.forkserver`), which is far
//! cheaper to fork and holds nothing of an earlier item. A Deno or bash kernel cannot fork
//! a Python interpreter, so there the cell starts the judge as a process of
//! its own (`python3 -m kiln_kernel.judge`, from the session's `PATH` and
//! `PYTHONPATH`), which runs each program test as a fork of itself that
//! execs the language's interpreter on the item's code (`judge.command`),
//! and passes its report lines on as the cell's output. A Python kernel can
//! call `judge.command` itself: an item that is a program only needs no
//! kernel of its language (see `batch`), and a Python session, forked from
//! the zygote, starts far faster than a Deno or bash kernel boots.

use base64::Engine as _;
use kiln_protocol::Language;

/// What a set of tests asks of the judge.
pub(crate) enum Tests<'a> {
    /// Run the item's code as a program once per standard input.
    Programs { code: &'a str, stdins: &'a [&'a String] },
    /// Run each assertion from the state the item's code left (Python).
    Assertions { codes: &'a [&'a String] },
}

impl<'a> Tests<'a> {
    /// How many tests.
    pub(crate) fn len(&self) -> usize {
        match self {
            Tests::Programs { stdins, .. } => stdins.len(),
            Tests::Assertions { codes } => codes.len(),
        }
    }

    /// The tests after the first `done`.
    pub(crate) fn after(&self, done: usize) -> Tests<'a> {
        match self {
            Tests::Programs { code, stdins } => Tests::Programs { code, stdins: &stdins[done..] },
            Tests::Assertions { codes } => Tests::Assertions { codes: &codes[done..] },
        }
    }
}

/// How a program in `language` is run (`{program}` stands for its path),
/// and what it needs in its environment beyond the session's, for the
/// languages whose tests run through `judge.command`.
fn interpreter(language: Language) -> Option<serde_json::Value> {
    // Deno as a Deno notebook runs a cell: every permission (the sandbox
    // is the boundary), no configuration or lock file from the work dir,
    // no prompts, update checks or colours (its kernel's environment).
    let deno = |ext: &str| {
        serde_json::json!({
            "argv": ["deno", "run", "--allow-all", "--quiet", "--no-config", "--no-lock", ext, "{program}"],
            "env": {"DENO_NO_PROMPT": "1", "DENO_NO_UPDATE_CHECK": "1", "NO_COLOR": "1"},
        })
    };
    match language {
        Language::Python => None,
        Language::Javascript => Some(deno("--ext=js")),
        Language::Typescript => Some(deno("--ext=ts")),
        Language::Bash => Some(serde_json::json!({"argv": ["bash", "{program}"], "env": {}})),
    }
}

/// How the judge's error begins when the kernel's fork server (or the
/// call's child of it) ended under a call (`judge._in_fork_server`).
const SERVER_ENDED: &str = "[kiln] the tests' runner ended";

/// Why a runner cell failed, when it failed because its fork server ended
/// under it: the judge's line, from [`SERVER_ENDED`] on (with the reason
/// the call's child gave, if it gave one). In a lane only the judge's own
/// errors reach the cell's error output (the kernel runs no item's code;
/// tests' outputs come back encoded).
pub(crate) fn lost_its_server(j: &crate::Judged) -> Option<String> {
    j.data.outputs.iter().find_map(|o| match o {
        kiln_protocol::Output::Error(e) => {
            let from = e.find(SERVER_ENDED)?;
            Some(e[from..].lines().next().unwrap_or_default().trim_end().to_string())
        }
        _ => None,
    })
}

/// The cell that makes a kernel's fork server a fork of the kernel itself
/// (`judge.image_server`): the first cell of an image lane.
pub(crate) const IMAGE_SERVER: &str = "__import__('kiln_kernel.judge').judge.image_server()";

/// The cell that empties a lane's work directory after an item that came
/// with files (`judge.empty_work_dir`).
pub(crate) const EMPTY_WORK_DIR: &str = "__import__('kiln_kernel.judge').judge.empty_work_dir()";

/// The cell, in the session's language `session`, that runs `tests` of an
/// item in `program`'s language, each with its own time limit
/// `timeout_secs`; `None` when they cannot run there (assertions are
/// Python's; a Python program needs a Python session). In a batch's `lane`
/// no test runs in a fork of the kernel, which served other items before
/// (they fork from the judge's fork server, whose forks hold only this
/// call).
pub(crate) fn cell(
    session: Language,
    program: Language,
    tests: &Tests<'_>,
    timeout_secs: f64,
    lane: bool,
) -> Option<String> {
    let (function, args) = match (tests, interpreter(program)) {
        (Tests::Programs { code, stdins }, None) if session == Language::Python => {
            ("program", serde_json::json!({"code": code, "stdins": stdins, "timeout": timeout_secs, "lane": lane}))
        }
        (Tests::Programs { code, stdins }, Some(run)) => (
            "command",
            serde_json::json!({"code": code, "stdins": stdins, "timeout": timeout_secs, "argv": run["argv"],
                               "env": run["env"], "lane": lane}),
        ),
        (Tests::Assertions { codes }, None) if session == Language::Python => {
            ("check", serde_json::json!({"codes": codes, "timeout": timeout_secs}))
        }
        _ => return None,
    };
    // base64: nothing in the tests can end the cell's string literal.
    let b64 = base64::engine::general_purpose::STANDARD.encode(args.to_string());
    Some(match session {
        Language::Python => format!("__import__('kiln_kernel.judge').judge.{function}('{b64}')"),
        // The arguments go on the judge's stdin: a program can be larger
        // than one command-line argument may be.
        Language::Javascript | Language::Typescript => format!(
            "{{\n  const judge = new Deno.Command(\"python3\", {{ args: [\"-m\", \"kiln_kernel.judge\"], stdin: \
             \"piped\", stdout: \"piped\", stderr: \"piped\" }}).spawn();\n  const input = judge.stdin.getWriter();\n  \
             await input.write(new TextEncoder().encode(\"{b64}\"));\n  await input.close();\n  const judged = await \
             judge.output();\n  const text = new TextDecoder().decode(judged.stdout);\n  if (text) \
             console.log(text.trimEnd());\n  if (!judged.success) throw new Error(\"[kiln] the test runner failed: \" + \
             new TextDecoder().decode(judged.stderr));\n}}"
        ),
        Language::Bash => format!("python3 -m kiln_kernel.judge <<'KILN_JUDGE_ARGS'\n{b64}\nKILN_JUDGE_ARGS"),
    })
}

/// What an item's cell in a lane needs (`judge.item`): its code and its
/// time limit, the output it may show, and its assertions with their
/// own time limit.
pub(crate) struct ItemCell<'a> {
    pub(crate) code: &'a str,
    pub(crate) timeout: std::time::Duration,
    pub(crate) output_limit: usize,
    /// The most the cell's record (JSON) may take.
    pub(crate) record_bytes: usize,
    pub(crate) assertions: &'a [&'a String],
    pub(crate) assertion_timeout: std::time::Duration,
}

/// The Python cell that runs `item` in a lane: its code as a cell in a fork
/// of the lane's image server, then its assertions, each a fork of that
/// (`judge.item`, `kiln_kernel.recorder`).
pub(crate) fn item_cell(item: &ItemCell<'_>) -> String {
    let args = serde_json::json!({
        "code": item.code,
        "cell_timeout": item.timeout.as_secs_f64(),
        "output_limit": item.output_limit,
        "record_bytes": item.record_bytes,
        "codes": item.assertions,
        "timeout": item.assertion_timeout.as_secs_f64(),
        "lane": true,
    });
    // base64: nothing in the code can end the cell's string literal.
    let b64 = base64::engine::general_purpose::STANDARD.encode(args.to_string());
    format!("__import__('kiln_kernel.judge').judge.item('{b64}')")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args_of(cell: &str) -> serde_json::Value {
        let b64 = cell.split(['\'', '"', '\n', ' ']).max_by_key(|s| s.len()).unwrap();
        serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
    }

    #[test]
    fn python_programs_and_assertions_run_in_the_kernel_itself() {
        let stdins = [&"1\n".to_string()];
        let programs = Tests::Programs { code: "print(1)", stdins: &stdins };
        let cell = cell(Language::Python, Language::Python, &programs, 2.0, false).unwrap();
        assert!(cell.starts_with("__import__('kiln_kernel.judge').judge.program('"), "{cell}");
        assert_eq!(
            args_of(&cell),
            serde_json::json!({"code": "print(1)", "stdins": ["1\n"], "timeout": 2.0, "lane": false})
        );
        let in_lane = super::cell(Language::Python, Language::Python, &programs, 2.0, true).unwrap();
        assert_eq!(args_of(&in_lane)["lane"], true);
        let codes = [&"assert 1".to_string()];
        let cell =
            super::cell(Language::Python, Language::Python, &Tests::Assertions { codes: &codes }, 2.0, false).unwrap();
        assert!(cell.contains(".judge.check('"), "{cell}");
    }

    #[test]
    fn a_lost_runner_is_told_apart_by_the_judge_s_own_line_and_keeps_its_reason() {
        let judged = |outputs| crate::Judged {
            data: kiln_protocol::ExecuteData {
                session_id: "ses_x".into(),
                status: kiln_protocol::ExecuteStatus::Error,
                outputs,
            },
            outcome: crate::Outcome::Raised,
            oom_kills: None,
        };
        let lost = judged(vec![
            kiln_protocol::Output::Stdout("KILN_JUDGE {}\n".into()),
            kiln_protocol::Output::Error(format!(
                "RuntimeError: {SERVER_ENDED}: the tests' fork server ended: binascii.Error: Incorrect padding\n\
                 Traceback (most recent call last):\n  ..."
            )),
        ]);
        assert_eq!(
            lost_its_server(&lost).as_deref(),
            Some("[kiln] the tests' runner ended: the tests' fork server ended: binascii.Error: Incorrect padding")
        );
        // A test's own error, or a judge's error of another kind, is not.
        let other = judged(vec![kiln_protocol::Output::Error("RuntimeError: [kiln] the tests did not run".into())]);
        assert_eq!(lost_its_server(&other), None);
        assert_eq!(lost_its_server(&judged(vec![kiln_protocol::Output::Stderr(SERVER_ENDED.into())])), None);
    }

    #[test]
    fn an_item_s_cell_carries_its_code_limits_and_assertions_to_the_lane() {
        let codes = [&"assert f() == 'x'".to_string()];
        let item = ItemCell {
            code: "def f():\n    return 'x'\n",
            timeout: std::time::Duration::from_millis(2500),
            output_limit: 1 << 20,
            record_bytes: 3 << 20,
            assertions: &codes,
            assertion_timeout: std::time::Duration::from_secs(4),
        };
        let cell = item_cell(&item);
        assert!(cell.starts_with("__import__('kiln_kernel.judge').judge.item('"), "{cell}");
        assert_eq!(
            args_of(&cell),
            serde_json::json!({"code": "def f():\n    return 'x'\n", "cell_timeout": 2.5, "output_limit": 1048576,
                               "record_bytes": 3145728, "codes": ["assert f() == 'x'"], "timeout": 4.0, "lane": true})
        );
    }

    #[test]
    fn other_languages_start_the_judge_with_their_own_interpreter() {
        let stdins = [&"1\n".to_string()];
        for (language, first, ext) in [
            (Language::Javascript, "deno", Some("--ext=js")),
            (Language::Typescript, "deno", Some("--ext=ts")),
            (Language::Bash, "bash", None),
        ] {
            let programs = Tests::Programs { code: "x", stdins: &stdins };
            let cell = cell(language, language, &programs, 2.0, false).unwrap();
            assert!(cell.contains("-m") && cell.contains("kiln_kernel.judge"), "{cell}");
            let args = args_of(&cell);
            // A Python session runs the same judge function in its kernel.
            let in_python = super::cell(Language::Python, language, &programs, 2.0, false).unwrap();
            assert!(in_python.starts_with("__import__('kiln_kernel.judge').judge.command('"), "{in_python}");
            assert_eq!(args_of(&in_python), args);
            let in_lane = super::cell(Language::Python, language, &programs, 2.0, true).unwrap();
            assert_eq!(args_of(&in_lane)["lane"], true);
            let argv: Vec<&str> = args["argv"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
            assert_eq!((argv[0], argv.last().copied()), (first, Some("{program}")), "{argv:?}");
            assert!(ext.is_none_or(|e| argv.contains(&e)), "{argv:?}");
            assert_eq!(args["code"], "x");
        }
    }

    #[test]
    fn assertions_are_python_s_alone_and_a_python_program_needs_a_python_session() {
        let codes = [&"assert 1".to_string()];
        let stdins = [&"1\n".to_string()];
        for language in [Language::Javascript, Language::Typescript, Language::Bash] {
            assert!(cell(language, language, &Tests::Assertions { codes: &codes }, 2.0, false).is_none());
            let programs = Tests::Programs { code: "print(1)", stdins: &stdins };
            assert!(cell(language, Language::Python, &programs, 2.0, false).is_none());
        }
    }
}
