//! Redis security fixtures: ACL users made from `docs/redis-acl.txt` (the lines the README
//! quotes), and a private redis-server speaking TLS with a CA made for the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The ACL file the README quotes.
pub const ACL_FILE: &str = include_str!("../../docs/redis-acl.txt");

/// Which binary an ACL line is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Dataflow,
    Api,
}

impl Role {
    fn user(self) -> &'static str {
        match self {
            Role::Dataflow => "streamrec-dataflow",
            Role::Api => "streamrec-api",
        }
    }
}

/// The `ACL SETUSER` line of `role`, as written in the file.
pub fn acl_line(role: Role) -> &'static str {
    let prefix = format!("ACL SETUSER {} ", role.user());
    ACL_FILE
        .lines()
        .find(|line| line.starts_with(&prefix))
        .unwrap_or_else(|| panic!("docs/redis-acl.txt has no line for {}", role.user()))
}

/// The file's `ACL SETUSER` line that adds to `role`'s user what a Redis Cluster needs.
pub fn acl_cluster_line(role: Role) -> &'static str {
    let prefix = format!("ACL SETUSER {} ", role.user());
    ACL_FILE
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .nth(1)
        .unwrap_or_else(|| panic!("docs/redis-acl.txt has no cluster line for {}", role.user()))
}

/// `line`'s rules for a user named `name` with `password` instead of the file's, less the
/// rules in `without` (each must be in the line).
fn user_rules(line: &str, role: Role, name: &str, password: &str, without: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = line
        .split_whitespace()
        .skip(2) // ACL SETUSER
        .map(str::to_owned)
        .collect();
    assert_eq!(args[0], role.user());
    args[0] = name.to_owned();
    if let Some(placeholder) = args.iter().position(|a| a == ">CHANGE-ME") {
        args[placeholder] = format!(">{password}");
    }
    for rule in without {
        let at = args
            .iter()
            .position(|a| a == rule)
            .unwrap_or_else(|| panic!("{rule} is not in the {} line", role.user()));
        args.remove(at);
    }
    args
}

/// Creates `role`'s user on every master of `cluster`, from the file's line and its cluster
/// line, less the rules in `without`; returns the seed list that logs in as it.
pub fn acl_user_on_cluster(
    cluster: &crate::cluster::PrivateCluster,
    role: Role,
    without: &[&str],
) -> String {
    let password = "cluster-user-pw";
    let name = format!("{}-test", role.user());
    let (line, cluster_line) = (acl_line(role), acl_cluster_line(role));
    let (from_line, from_cluster): (Vec<&str>, Vec<&str>) = without
        .iter()
        .partition(|rule| line.split_whitespace().any(|r| r == **rule));
    for &port in cluster.ports() {
        let mut conn = cluster.node(port);
        for args in [
            user_rules(line, role, &name, password, &from_line),
            user_rules(cluster_line, role, &name, password, &from_cluster),
        ] {
            let _: () = redis::cmd("ACL")
                .arg("SETUSER")
                .arg(&args)
                .query(&mut conn)
                .unwrap_or_else(|e| panic!("ACL SETUSER {args:?}: {e}"));
        }
    }
    cluster
        .ports()
        .iter()
        .map(|port| format!("redis://{name}:{password}@127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// An ACL user made from the file's line on a Redis; deleted on drop.
#[derive(Debug)]
pub struct AclUser {
    admin: redis::Client,
    /// The user's name: the file's, made unique to this test run.
    pub name: String,
    pub password: String,
    host_port: String,
    scheme: &'static str,
}

impl AclUser {
    /// Creates `role`'s user on the Redis `admin` connects to, as the file says, less the
    /// rules in `without` (for tests of a missing permission; each must be in the line).
    /// `admin_url` is the admin's URL, without credentials: the user's URLs are made from it.
    pub fn create(admin: redis::Client, admin_url: &str, role: Role, without: &[&str]) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{}-test-{}-{}",
            role.user(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let password = format!("pw-{nanos}");
        assert!(
            acl_line(role).contains(">CHANGE-ME"),
            "the line sets the password >CHANGE-ME"
        );
        let args = user_rules(acl_line(role), role, &name, &password, without);
        let mut conn = admin
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("Redis unreachable at {admin_url}: {e}"));
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&args)
            .query(&mut conn)
            .unwrap_or_else(|e| panic!("ACL SETUSER {args:?}: {e}"));
        let (scheme, rest) = admin_url.split_once("://").unwrap();
        let host_port = rest.rsplit('@').next().unwrap();
        let host_port = host_port.split('/').next().unwrap().to_owned();
        AclUser {
            admin,
            name,
            password,
            host_port,
            scheme: if scheme == "rediss" {
                "rediss"
            } else {
                "redis"
            },
        }
    }

    /// The URL that logs in as this user, on database `db`.
    pub fn url(&self, db: u32) -> String {
        format!(
            "{}://{}:{}@{}/{db}",
            self.scheme, self.name, self.password, self.host_port
        )
    }
}

impl Drop for AclUser {
    fn drop(&mut self) {
        // Best effort: a test that failed should still report its own failure.
        if let Ok(mut conn) = self
            .admin
            .get_connection_with_timeout(Duration::from_secs(5))
        {
            let _: Result<i64, _> = redis::cmd("ACL")
                .arg("DELUSER")
                .arg(&self.name)
                .query(&mut conn);
        }
    }
}

/// A redis-server of this test with TLS only (no plain port), its certificate signed by a CA
/// made for it; killed, and its directory removed, on drop.
#[derive(Debug)]
pub struct TlsRedis {
    pub port: u16,
    /// The CA that signed the server's certificate (PEM).
    pub ca_file: PathBuf,
    /// Another CA, that signed nothing the server has (PEM).
    pub other_ca_file: PathBuf,
    dir: tempfile::TempDir,
    child: Child,
}

impl TlsRedis {
    /// Makes the CAs and the server's certificate (for 127.0.0.1 and localhost) with the
    /// `openssl` command, starts redis-server on a free port and waits until it answers PING
    /// over TLS.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("streamrec-tls-redis")
            .tempdir()
            .unwrap();
        let path = dir.path();
        make_certificates(path);
        let port = crate::free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--tls-cert-file")
            .arg(path.join("server.pem"))
            .arg("--tls-key-file")
            .arg(path.join("server.key"))
            .arg("--tls-ca-cert-file")
            .arg(path.join("ca.pem"))
            .args(["--tls-auth-clients", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (is it installed?): {e}"));
        let server = TlsRedis {
            port,
            ca_file: path.join("ca.pem"),
            other_ca_file: path.join("other-ca.pem"),
            dir,
            child,
        };
        let client = server.admin();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = client
                .get_connection_with_timeout(Duration::from_millis(500))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ready.is_ok() {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "TLS redis-server on port {port} did not come up: {ready:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `rediss://127.0.0.1:{port}/{db}`.
    pub fn url(&self, db: u32) -> String {
        format!("rediss://127.0.0.1:{}/{db}", self.port)
    }

    /// A client of the default user that trusts the server's CA.
    pub fn admin(&self) -> redis::Client {
        redis::Client::build_with_tls(
            self.url(0),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(&self.ca_file).unwrap()),
            },
        )
        .unwrap()
    }

    /// The directory of its files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ca.pem`, `server.pem` + `server.key` (signed by it, for 127.0.0.1 and localhost) and an
/// unrelated `other-ca.pem`, in `dir`.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run openssl (apt-get install openssl; .ci/run does): {e}")
            });
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    for ca in ["ca", "other-ca"] {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=streamrec test {ca}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    }
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
         basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README quotes the ACL file's lines word for word, so that what people paste is
    /// what the tests check.
    #[test]
    fn the_readme_quotes_the_acl_lines() {
        let readme = include_str!("../../README.md");
        for role in [Role::Dataflow, Role::Api] {
            for line in [acl_line(role), acl_cluster_line(role)] {
                assert!(
                    readme.lines().any(|l| l.trim() == line),
                    "README.md does not quote docs/redis-acl.txt's line:\n{line}"
                );
            }
        }
    }
}
