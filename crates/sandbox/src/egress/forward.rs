//! Inside the sandbox: the session's end of its egress socket.
//!
//! A session's network namespace has only loopback, so programs reach the
//! proxy the usual way, `http://127.0.0.1:3128` (`HTTPS_PROXY`), and this
//! forwarder relays each such connection to the Unix socket bound into the
//! sandbox. It runs as the session user under the session's seccomp filter
//! and limits, so whatever it costs is the session's own.

/// The port of the proxy inside each session.
pub const PROXY_PORT: u16 = 3128;

/// Accept on `127.0.0.1:PROXY_PORT` and relay every connection to the Unix
/// socket `socket`. Blocking, thread per direction; runs in its own process
/// forked by the sandbox's init. Never returns.
pub fn forward(socket: &std::path::Path) -> ! {
    let listener = match std::net::TcpListener::bind(("127.0.0.1", PROXY_PORT)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kiln sandbox: egress forwarder cannot listen: {e}");
            crate::init::exit(1)
        }
    };
    for conn in listener.incoming().flatten() {
        let Ok(up) = std::os::unix::net::UnixStream::connect(socket) else { continue };
        let (Ok(mut c2), Ok(mut u2)) = (conn.try_clone(), up.try_clone()) else { continue };
        let (mut c1, mut u1) = (conn, up);
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut c1, &mut u1);
            let _ = u1.shutdown(std::net::Shutdown::Write);
        });
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut u2, &mut c2);
            let _ = c2.shutdown(std::net::Shutdown::Write);
        });
    }
    crate::init::exit(0)
}
