//! A real PostgreSQL server for tests, in a temporary directory.
//!
//! [`PgServer::start`] runs Debian's `postgres` (installed by
//! `scripts/system-deps --test`) on a fresh cluster: its data directory and
//! Unix socket live in a private temporary directory, and with
//! [`PgOptions::listen`] it also listens on a free TCP port of that address.
//! Tests can [`stop`](PgServer::stop), [`start_again`](PgServer::start_again)
//! or [`restart`](PgServer::restart) it (same data, same URL) to play a
//! database restart. Dropping it (also while a test panics) stops the
//! server and removes the directory; a server left by a test process that
//! was killed is removed by the next start.
//!
//! `initdb` and `postgres` refuse to run as root, so as root they run as
//! the `postgres` system user. The cluster is made once per machine (a
//! template in the test cache, `initdb` costs seconds) and copied for each
//! server. Durability settings are relaxed (`fsync=off`): a test stops and
//! kills servers, never the machine.
#![forbid(unsafe_code)]

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid, User};
use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The database superuser the test clusters have (trusted, no password).
pub const USER: &str = "kiln";

/// How a server is started.
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// Also listen on TCP at this address (a free port is picked), for
    /// clients that cannot reach the Unix socket.
    pub listen: Option<IpAddr>,
}

/// A running (or stopped) PostgreSQL server owned by a test.
#[derive(Debug)]
pub struct PgServer {
    root: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    listen: Option<IpAddr>,
    child: Option<Child>,
    started_in: Duration,
}

impl PgServer {
    /// A fresh server on a private Unix socket. Panics (with the server's
    /// log) if it cannot start.
    pub fn start() -> PgServer {
        PgServer::start_with(PgOptions::default())
    }

    /// A fresh server with these options.
    pub fn start_with(opts: PgOptions) -> PgServer {
        let began = Instant::now();
        let bin = bin_dir();
        reap_abandoned();
        let template = template(&bin);
        let root = tempfile::Builder::new()
            .prefix("kiln-pg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("testpg: cannot make a temporary directory: {e}"));
        write(&root.path().join("owner"), &std::process::id().to_string());
        let data = root.path().join("data");
        run(Command::new("cp").arg("-a").arg(&template).arg(&data), "copy the template cluster");
        if opts.listen.is_some() {
            // Clients on the listening address's own subnet (a test's
            // network namespaces on its bridge) are trusted like local ones.
            let hba = data.join("pg_hba.conf");
            let mut rules = std::fs::read_to_string(&hba).unwrap_or_default();
            rules.push_str("host all all samenet trust\n");
            write(&hba, &rules);
        }
        give_to_postgres(root.path());
        let port = match opts.listen {
            Some(ip) => TcpListener::bind((ip, 0))
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap_or_else(|e| panic!("testpg: no free port on {ip}: {e}")),
            // Only the private socket: the port just names it.
            None => 5432,
        };
        let mut server = PgServer { root, bin, port, listen: opts.listen, child: None, started_in: Duration::ZERO };
        server.start_again();
        server.started_in = began.elapsed();
        server
    }

    /// Start the stopped server again on its data, socket and port.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "testpg: the server is already running");
        let log = std::fs::File::create(self.log_path())
            .unwrap_or_else(|e| panic!("testpg: cannot create the server log: {e}"));
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.root.path().join("data"))
            .arg("-k")
            .arg(self.root.path())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!("listen_addresses={}", self.listen.map(|a| a.to_string()).unwrap_or_default()))
            .args(["-c", "fsync=off", "-c", "full_page_writes=off", "-c", "shared_buffers=16MB"])
            .args(["-c", "max_connections=200", "-c", "logging_collector=off"])
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        as_postgres(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("testpg: cannot run postgres: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.is_ready() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!("testpg: postgres exited ({status}) while starting:\n{}", self.log());
            }
            if Instant::now() > deadline {
                panic!("testpg: postgres was not ready within 60 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop the server (a fast shutdown: clients are disconnected, the data
    /// is kept) and wait until it has exited.
    pub fn stop(&mut self) {
        self.signal_and_wait(Signal::SIGINT, Duration::from_secs(30));
    }

    /// Stop and start again.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// How long [`PgServer::start`] took (copying the cluster, starting,
    /// waiting until it accepts connections).
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The URL of the `postgres` database: the Unix socket, or TCP when the
    /// server listens on an address.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of another database on this server.
    pub fn url_of(&self, db: &str) -> String {
        match self.listen {
            Some(IpAddr::V6(ip)) => format!("postgresql://{USER}@[{ip}]:{}/{db}", self.port),
            Some(ip) => format!("postgresql://{USER}@{ip}:{}/{db}", self.port),
            None => format!("postgresql:///{db}?host={}&port={}&user={USER}", self.root.path().display(), self.port),
        }
    }

    /// Create a database; returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.psql(&format!("CREATE DATABASE \"{name}\""));
        self.url_of(name)
    }

    /// Run SQL with `psql` on the `postgres` database; returns its output
    /// (unaligned, tuples only). Panics if it fails.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.psql_command(sql).output().unwrap_or_else(|e| panic!("testpg: cannot run psql: {e}"));
        assert!(out.status.success(), "testpg: psql {sql:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The `psql` command that [`PgServer::psql`] runs, to run it in the
    /// background (e.g. a transaction that holds a lock for a while).
    pub fn psql_command(&self, sql: &str) -> Command {
        let mut cmd = Command::new(self.bin.join("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", USER, "-d", "postgres", "-h"])
            .arg(self.root.path())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(sql);
        cmd
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("postgres.log")
    }

    fn is_ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-U", USER, "-d", "postgres", "-h"])
            .arg(self.root.path())
            .arg("-p")
            .arg(self.port.to_string())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn signal_and_wait(&mut self, signal: Signal, grace: Duration) {
        let Some(mut child) = self.child.take() else { return };
        // The child is ours and not yet reaped, so its pid is still it.
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        let _ = kill(pid, signal);
        let deadline = Instant::now() + grace;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // An immediate shutdown: the data is thrown away with the directory.
        self.signal_and_wait(Signal::SIGQUIT, Duration::from_secs(10));
    }
}

/// The newest installed PostgreSQL's binaries (`KILN_TEST_PG_BIN` wins).
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let versions = std::fs::read_dir("/usr/lib/postgresql").into_iter().flatten().flatten();
    let newest = versions
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("postgres").is_file())
        .max_by_key(|(v, _)| *v);
    match newest {
        Some((_, bin)) => bin,
        None => panic!(
            "testpg: no PostgreSQL server under /usr/lib/postgresql; run scripts/system-deps --test \
             (or set KILN_TEST_PG_BIN to a directory with postgres, initdb, pg_isready and psql)"
        ),
    }
}

/// The template cluster for this PostgreSQL version, made once per machine.
///
/// Test processes and the threads within them ask at the same moment on a
/// machine that has none yet, so the first to take the cache's lock makes
/// it while the others wait, then find it made. It is copied aside and
/// renamed into place, so a test killed mid-copy leaves no half a template.
fn template(bin: &Path) -> PathBuf {
    let cache = std::env::var_os("KILN_TEST_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache/kiln-test")
    });
    template_in(&cache, bin)
}

/// The PostgreSQL version a server directory is for (the name of the
/// directory above `bin`, as Debian lays them out), which names its template.
fn version(bin: &Path) -> String {
    bin.parent().and_then(Path::file_name).and_then(|v| v.to_str()).unwrap_or("pg").to_string()
}

/// [`template`], in the test cache `cache`.
fn template_in(cache: &Path, bin: &Path) -> PathBuf {
    let version = version(bin);
    let dir = cache.join("postgres");
    let template = dir.join(format!("{version}-template"));
    if template.join("PG_VERSION").is_file() {
        return template;
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("testpg: cannot create {}: {e}", dir.display()));
    let lock_path = dir.join(format!("{version}-template.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("testpg: cannot open {}: {e}", lock_path.display()));
    // Held until this function returns; an `flock` is per open file, so it
    // also keeps this process's other threads out.
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("testpg: cannot lock {}: {e}", lock_path.display()));
    if template.join("PG_VERSION").is_file() {
        return template;
    }
    // initdb runs in the temporary directory: the `postgres` user may not
    // reach the cache (under root's home); root copies the result.
    let scratch = tempfile::Builder::new()
        .prefix("kiln-initdb-")
        .tempdir()
        .unwrap_or_else(|e| panic!("testpg: cannot make a temporary directory: {e}"));
    give_to_postgres(scratch.path());
    let data = scratch.path().join("data");
    let mut cmd = Command::new(bin.join("initdb"));
    cmd.arg("-D")
        .arg(&data)
        .args(["-U", USER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--wal-segsize=1"])
        .env("LC_ALL", "C");
    as_postgres(&mut cmd);
    run(&mut cmd, "initdb");
    // Copied beside the template so the rename cannot cross filesystems. A
    // test killed mid-copy leaves this directory (a name no one reads), never
    // a half-made template.
    let staged = tempfile::Builder::new()
        .prefix(&format!("{version}-staged-"))
        .tempdir_in(&dir)
        .unwrap_or_else(|e| panic!("testpg: cannot make a directory in {}: {e}", dir.display()));
    let copy = staged.path().join("data");
    run(Command::new("cp").arg("-a").arg(&data).arg(&copy), "copy the new cluster");
    // A template without PG_VERSION is one that an unlocked maker of old
    // left half made: no one else writes it while the lock is held.
    let _ = std::fs::remove_dir_all(&template);
    std::fs::rename(&copy, &template)
        .unwrap_or_else(|e| panic!("testpg: cannot move the new cluster to {}: {e}", template.display()));
    template
}

/// Remove the servers and directories of test processes that are gone
/// (killed before their `PgServer` was dropped).
fn reap_abandoned() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_name().to_string_lossy().starts_with("kiln-pg-") {
            continue;
        }
        let owner = std::fs::read_to_string(path.join("owner")).ok().and_then(|s| s.trim().parse::<i32>().ok());
        match owner {
            Some(pid) if Path::new(&format!("/proc/{pid}")).exists() => continue,
            // Being set up right now by a live process (no owner file yet).
            None if std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(60)) =>
            {
                continue
            }
            _ => {}
        }
        let postmaster = std::fs::read_to_string(path.join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if let Some(pid) = postmaster {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "postgres" {
                let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
                let deadline = Instant::now() + Duration::from_secs(10);
                while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&path);
    }
}

/// The `postgres` system user, when running as root.
fn postgres_user() -> Option<(Uid, Gid)> {
    if !Uid::effective().is_root() {
        return None;
    }
    match User::from_name("postgres") {
        Ok(Some(u)) => Some((u.uid, u.gid)),
        _ => panic!("testpg: running as root, and there is no `postgres` user to run PostgreSQL as"),
    }
}

fn as_postgres(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = postgres_user() {
        cmd.uid(uid.as_raw()).gid(gid.as_raw());
    }
}

/// Hand a directory tree to the `postgres` user (when running as root).
fn give_to_postgres(dir: &Path) {
    if let Some((uid, gid)) = postgres_user() {
        run(Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(dir), "chown");
    }
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("testpg: cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "testpg: {what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("testpg: cannot write {}: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;

    #[test]
    fn a_server_starts_answers_restarts_and_leaves_nothing_behind() {
        let mut pg = PgServer::start();
        eprintln!("testpg: started in {:?}", pg.started_in());
        assert_eq!(pg.psql("SELECT 1 + 1"), "2");
        pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (7)");
        pg.restart();
        assert_eq!(pg.psql("SELECT x FROM t"), "7", "data survives a restart");
        pg.stop();
        assert!(!pg.is_ready(), "a stopped server does not answer");
        pg.start_again();
        let dir = pg.root.path().to_path_buf();
        let pid = pg.child.as_ref().map(Child::id).unwrap_or(0);
        drop(pg);
        assert!(!dir.exists(), "the directory is removed");
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the server is gone");
    }

    #[test]
    fn threads_asking_at_once_on_a_new_machine_all_get_one_whole_template() {
        let cache = tempfile::tempdir().expect("cache");
        let bin = bin_dir();
        let made: Vec<PathBuf> = std::thread::scope(|scope| {
            let asks: Vec<_> = (0..4).map(|_| scope.spawn(|| template_in(cache.path(), &bin))).collect();
            asks.into_iter().map(|a| a.join().expect("no thread panics")).collect()
        });
        assert!(made.iter().all(|t| *t == made[0]), "{made:?}");
        for file in ["PG_VERSION", "global/pg_control", "base/1/PG_VERSION"] {
            assert!(made[0].join(file).is_file(), "{file} in the template");
        }
        let mut left: Vec<String> = std::fs::read_dir(cache.path().join("postgres"))
            .expect("the cache")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let version = version(&bin);
        assert_eq!(left, [format!("{version}-template"), format!("{version}-template.lock")], "nothing staged is left");
    }

    #[test]
    fn a_server_can_listen_on_tcp_and_databases_get_their_own_urls() {
        let pg = PgServer::start_with(PgOptions { listen: Some(IpAddr::from([127, 0, 0, 1])) });
        assert!(pg.url().starts_with("postgresql://kiln@127.0.0.1:"), "{}", pg.url());
        let url = pg.create_database("other");
        assert!(url.ends_with("/other"), "{url}");
        assert_eq!(pg.psql("SELECT count(*) FROM pg_database WHERE datname = 'other'"), "1");
    }
}
