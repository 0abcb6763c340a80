//! A real registry for tests: the CNCF distribution server (Debian's `docker-registry`) on a
//! free loopback port with its own storage directory, stopped by pid when its guard drops.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
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
        let yaml = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: pf-test-upload-secret\n{auth_yaml}",
            storage.display()
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
            if let Some(status) = http_status(self.port, "/v2/")
                && (status == 200 || status == 401)
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

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
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

/// The status of a plain `GET path` on loopback, if anything answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
