//! A real registry for tests: the CNCF distribution server (Debian's `docker-registry`) on a
//! free port (loopback, or another address of the machine, with TLS if asked) with its own
//! storage directory, stopped by pid when its guard drops.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server binary: `$PF_DOCKER_REGISTRY`, else Debian's `/usr/bin/docker-registry`.
pub fn registry_binary() -> PathBuf {
    std::env::var_os("PF_DOCKER_REGISTRY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/docker-registry"))
}

/// A running registry; dropping it kills the server by its pid.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    host: IpAddr,
    tls: bool,
    port: u16,
    storage: PathBuf,
    conf: tempfile::TempDir,
}

/// How a test registry authenticates: the `auth:` section of its config.
#[derive(Debug, Clone)]
pub struct RegistryAuth {
    yaml: String,
}

impl RegistryAuth {
    /// The bearer-token flow: clients get a token from `realm` (a token server the test runs),
    /// signed by the key of `cert` (PEM), issued by `issuer` for `service`.
    pub fn token(realm: &str, service: &str, issuer: &str, cert: &Path) -> Self {
        Self {
            yaml: format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                cert.display()
            ),
        }
    }
}

impl Registry {
    /// Start a registry storing into `storage` on a free loopback port, with htpasswd basic
    /// auth when `auth` is given. Panics with the fix when the server is not installed.
    pub fn start(storage: &Path, auth: Option<&RegistryAuth>) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        Self::start_on(storage, port, auth)
    }

    /// Start a registry on a given port (to restart one on the same storage and address).
    pub fn start_on(storage: &Path, port: u16, auth: Option<&RegistryAuth>) -> Self {
        Self::launch(storage, IpAddr::V4(Ipv4Addr::LOCALHOST), port, auth, None)
    }

    /// Start a registry listening on `host` (e.g. [`non_loopback_ipv4`]) on a free port, plain
    /// http, or https with `tls` (the server's certificate chain and key, PEM files).
    pub fn start_at(storage: &Path, host: IpAddr, tls: Option<(&Path, &Path)>) -> Self {
        let port = TcpListener::bind((host, 0))
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|err| panic!("a free port on {host}: {err}"))
            .port();
        Self::launch(storage, host, port, None, tls)
    }

    fn launch(
        storage: &Path,
        host: IpAddr,
        port: u16,
        auth: Option<&RegistryAuth>,
        tls: Option<(&Path, &Path)>,
    ) -> Self {
        let binary = registry_binary();
        assert!(
            binary.exists(),
            "{} is missing: install the CNCF registry with `apt-get install -y docker-registry` (cargo xtask ci does)",
            binary.display()
        );
        let conf = tempfile::tempdir().expect("a temp dir");
        // `http.secret` signs upload sessions' `_state`: a fixed one lets a registry started
        // again on the same storage continue uploads begun before (as a real deployment's
        // configured secret does; without one each start draws a random secret).
        let auth_yaml = auth.map(|a| a.yaml.clone()).unwrap_or_default();
        let tls_yaml = tls
            .map(|(cert, key)| {
                format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    cert.display(),
                    key.display()
                )
            })
            .unwrap_or_default();
        let yaml = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {}\n  secret: pf-test-upload-secret\n{tls_yaml}{auth_yaml}",
            storage.display(),
            std::net::SocketAddr::new(host, port),
        );
        let config = conf.path().join("config.yml");
        std::fs::write(&config, yaml).expect("writing the registry config");
        let log = std::fs::File::create(conf.path().join("registry.log")).expect("a log file");
        let child = Command::new(&binary)
            .arg("serve")
            .arg(&config)
            .current_dir(conf.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("starting {}: {err}", binary.display()));
        let mut registry = Self {
            child: Some(child),
            host,
            tls: tls.is_some(),
            port,
            storage: storage.to_owned(),
            conf,
        };
        registry.wait_ready();
        registry
    }

    /// Wait until `/v2/` answers (200 or 401), or panic with the server's log.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("the registry exited ({status}) at start:\n{}", self.log());
            }
            // A TLS server answers plain http with 400 ("an HTTP request to an HTTPS server").
            if let Some(status) = http_status(self.host, self.port, "/v2/")
                && (status == 200 || status == 401 || (self.tls && status == 400))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the registry did not answer on port {} within 20 s:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `HOST:PORT` (`127.0.0.1:PORT` unless started [`at`](Self::start_at) another address).
    pub fn addr(&self) -> String {
        std::net::SocketAddr::new(self.host, self.port).to_string()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its storage directory.
    pub fn storage(&self) -> &Path {
        &self.storage
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.conf.path().join("registry.log")).unwrap_or_default()
    }

    /// Where the registry keeps the blob `hex` (its filesystem layout).
    pub fn blob_data_path(&self, hex: &str) -> PathBuf {
        self.storage.join(format!(
            "docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }

    /// Kill the server (SIGKILL, by its pid) and reap it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Write an htpasswd file for `user` and `password` into `dir` with `htpasswd -B` (bcrypt, as
/// the registry requires; Debian's `apache2-utils`).
pub fn htpasswd(dir: &Path, user: &str, password: &str) -> RegistryAuth {
    let path = dir.join("htpasswd");
    let out = Command::new("htpasswd")
        .args(["-Bbn", user, password])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .expect("htpasswd is missing: `apt-get install -y apache2-utils` (cargo xtask ci does)");
    assert!(out.status.success(), "htpasswd failed: {}", out.status);
    std::fs::write(&path, &out.stdout).expect("writing htpasswd");
    RegistryAuth {
        yaml: format!(
            "auth:\n  htpasswd:\n    realm: pf-test\n    path: {}\n",
            path.display()
        ),
    }
}

/// Write a docker config holding basic credentials for `registry` into `dir`; its path.
pub fn docker_config(dir: &Path, registry: &str, user: &str, password: &str) -> PathBuf {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let path = dir.join("config.json");
    let text = serde_json::json!({"auths": {registry: {"auth": auth}}}).to_string();
    std::fs::write(&path, text).expect("writing the docker config");
    path
}

/// The status of a plain `GET path` on `host:port`, if anything answers.
fn http_status(host: IpAddr, port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect((host, port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// An IPv4 address of this machine that is not a loopback one (the source address of its
/// route towards a public address; no packet is sent). Panics when it has none: a test of
/// non-loopback registries needs a network interface.
pub fn non_loopback_ipv4() -> Ipv4Addr {
    let found = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.255:9").map(|()| s))
        .or_else(|_| {
            std::net::UdpSocket::bind("0.0.0.0:0")
                .and_then(|s| s.connect("203.0.113.1:9").map(|()| s))
        })
        .and_then(|s| s.local_addr());
    match found {
        Ok(std::net::SocketAddr::V4(addr)) if !addr.ip().is_loopback() => *addr.ip(),
        other => panic!(
            "this machine has no non-loopback IPv4 address with a route ({other:?}): the test needs a network interface"
        ),
    }
}

/// A throwaway certificate authority and a server certificate it signed for `ip`, made with the
/// `openssl` command line in `dir`.
#[derive(Debug, Clone)]
pub struct TestCerts {
    /// The authority's certificate (PEM): what a client must trust.
    pub ca: PathBuf,
    /// The server's certificate (PEM), for `ip` (a subjectAltName), signed by the authority.
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
}

impl TestCerts {
    /// Make them (P-256 keys, valid for two days).
    pub fn make(dir: &Path, ip: IpAddr) -> Self {
        let certs = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        let ext = dir.join("server.ext");
        std::fs::write(
            &ext,
            format!(
                "subjectAltName=IP:{ip}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .expect("writing the certificate extensions");
        // A name of its own: two authorities of one test are told apart by name.
        let authority = format!(
            "/CN=pf test authority{}",
            dir.display().to_string().replace(['/', '='], " ")
        );
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        openssl(
            dir,
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    &authority,
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign",
                ],
            ]
            .concat(),
        );
        openssl(
            dir,
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=pf test registry",
                ],
            ]
            .concat(),
        );
        openssl(
            dir,
            &[
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
            ],
        );
        certs
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("openssl is missing: `apt-get install -y openssl` (cargo xtask ci does)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
