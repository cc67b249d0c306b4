//! Ways from one session to another, or out of the work directory, that
//! were found closed and must stay so: abstract Unix sockets (named in the
//! network namespace, not the filesystem) and upload names that only look
//! like `..` or hide their real order.

use super::stdout_of;
use crate::common::{start, text_of, KEY};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn an_abstract_unix_socket_is_private_to_its_session() {
    let s = start(&["--pool-size", "2"]);
    let name = format!("kiln-test-{}", std::process::id());
    let listen = format!(
        "import socket\nserver = socket.socket(socket.AF_UNIX)\nserver.bind('\\0{name}')\nserver.listen(8)\n\
         server.setblocking(False)\nprint('listening')"
    );
    let a = s.exec(&listen, None).await;
    assert_eq!(text_of(&a, "stdout"), "listening\n", "{a}");
    let a_id = a["session_id"].as_str().unwrap().to_string();
    let connect = format!(
        "import socket\nc = socket.socket(socket.AF_UNIX)\ntry:\n    c.connect('\\0{name}'); print('CONNECTED')\n\
         except OSError as e:\n    print(type(e).__name__)"
    );
    // Another session, and the host, see no such socket.
    assert_eq!(stdout_of(&s, &connect).await, "ConnectionRefusedError\n");
    use std::os::linux::net::SocketAddrExt;
    let host = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    assert!(std::os::unix::net::UnixStream::connect_addr(&host).is_err(), "the host reached the session's socket");
    // The listener never got a connection, though it can take its own.
    let check = format!(
        "try:\n    server.accept(); print('ACCEPTED')\nexcept BlockingIOError:\n    print('nobody came')\n\
         {connect}"
    );
    let d = s.exec(&check, Some(&a_id)).await;
    assert_eq!(text_of(&d, "stdout"), "nobody came\nCONNECTED\n", "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_names_that_look_like_dots_or_reverse_stay_literal_in_the_work_dir() {
    // Fullwidth full stops, the two-dot leader and small full stops all
    // normalise (NFKC) to "."; a right-to-left override makes a name read
    // backwards. None of them may be taken for "..", or rewritten.
    let s = start(&[]);
    let names = [
        "\u{ff0e}\u{ff0e}/\u{ff0e}\u{ff0e}/escaped-fullwidth.txt",
        "\u{2025}/escaped-leader.txt",
        "\u{fe52}\u{fe52}/escaped-small.txt",
        "\u{202e}txt.exe",
        "\u{202e}../escaped-rtl.txt",
    ];
    let files: Vec<_> =
        names.iter().map(|n| json!({"name": n, "encoding": "string", "content": format!("content of {n}")})).collect();
    let code = "import os\nfor root, _, fs in os.walk('/work'):\n    for f in fs:\n        \
                p = os.path.join(root, f)\n        print(p.encode().hex(), open(p).read() == 'content of ' + os.path.relpath(p, '/work'))";
    let (st, v) = s.post("/tci/execute", Some(KEY), json!({"code": code, "files": files})).await;
    assert_eq!(st, 200, "{v}");
    let out = text_of(&v["data"], "stdout");
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let mut expected: Vec<String> = names.iter().map(|n| format!("{} True", hex(&format!("/work/{n}")))).collect();
    expected.sort();
    let mut got: Vec<String> = out.lines().map(str::to_string).collect();
    got.sort();
    assert_eq!(got, expected, "{out}");
    // On the host, nothing was written beside the work directory.
    let mut stray = Vec::new();
    let mut stack = vec![s.data.path().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if path.to_string_lossy().contains("escaped") && !path.to_string_lossy().contains("/data/work/") {
                stray.push(path);
            }
        }
    }
    assert!(stray.is_empty(), "written outside the work dir: {stray:?}");
}
