//! A tansu broker of a test's own, on a free loopback port, for tests that stall, stop or
//! restart the broker (SIGSTOP, SIGCONT, SIGTERM) without disturbing the shared test broker the
//! other tests use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tansu binary: on PATH, else where `cargo install` puts it.
pub fn tansu_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("tansu"))
            .find(|candidate| candidate.is_file())
    });
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")));
    on_path
        .or_else(|| {
            cargo_home
                .map(|home| home.join("bin/tansu"))
                .filter(|p| p.is_file())
        })
        .expect("tansu is neither on PATH nor in ~/.cargo/bin; run scripts/services.sh start")
}

use crate::free_port;

/// Our own tansu. Dropping it thaws and kills it, also when the test fails half-way.
#[derive(Debug)]
pub struct Broker {
    child: Child,
    pub addr: SocketAddr,
    storage: String,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Broker {
    /// A broker with memory storage: its topics live as long as the process.
    pub fn start() -> Broker {
        Broker::start_with_storage("memory://tansu/")
    }

    /// A broker with sqlite storage in its own temporary directory, which a restart (see
    /// [`restart`](Self::restart)) keeps.
    pub fn start_sqlite() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        // Relative to the broker's working directory, the temporary one.
        let storage = "sqlite://tansu.db".to_owned();
        Broker::spawn(
            dir,
            storage,
            SocketAddr::from(([127, 0, 0, 1], free_port())),
        )
    }

    /// A broker with `storage` (a tansu `--storage-engine` URL).
    pub fn start_with_storage(storage: &str) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        Broker::spawn(
            dir,
            storage.to_owned(),
            SocketAddr::from(([127, 0, 0, 1], free_port())),
        )
    }

    fn spawn(dir: tempfile::TempDir, storage: String, addr: SocketAddr) -> Broker {
        let url = format!("tcp://{addr}");
        let log = dir.path().join("tansu.log");
        let child = launch(dir.path(), &url, &storage, &log);
        Broker {
            child,
            addr,
            storage,
            log,
            dir,
        }
    }

    /// The `bootstrap.servers` of this broker.
    pub fn brokers(&self) -> String {
        self.addr.to_string()
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (a name kill(1) knows: STOP, CONT, TERM) to the broker.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Stops the broker with SIGTERM (waiting at most 10 s for it to exit, then SIGKILL), and
    /// after `down` starts it again on the same address and storage.
    pub fn restart(&mut self, down: Duration) {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(down);
        let url = format!("tcp://{}", self.addr);
        self.child = launch(self.dir.path(), &url, &self.storage, &self.log);
    }

    /// Waits, at most 30 s, until the broker accepts connections.
    pub async fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(self.addr).await.is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("tansu exited with {status}: {log}");
            }
            assert!(
                Instant::now() < deadline,
                "tansu never listened on {}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Starts tansu in `dir` (it reads a .env from its working directory: this gives it an empty
/// one of its own), its output in `log`.
fn launch(dir: &Path, url: &str, storage: &str, log: &Path) -> Child {
    let append = |path: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
    };
    Command::new(tansu_binary())
        .args(["broker", "--cluster-id", "streamrec-recovery"])
        .args(["--listener-url", url, "--advertised-listener-url", url])
        .args(["--storage-engine", storage])
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(append(log))
        .stderr(append(&dir.join("tansu.err")))
        .spawn()
        .unwrap()
}

impl Drop for Broker {
    fn drop(&mut self) {
        // A failed test shows what the broker logged (warnings and errors): a broker that
        // misbehaved after a restart is then told from a fault of the code under test.
        if std::thread::panicking() {
            for name in ["tansu.log", "tansu.err"] {
                let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("--- the broker's {name}, last {} lines:", tail.len());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        // A stopped process dies of SIGKILL too, but thaw it first in case kill is refused.
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
