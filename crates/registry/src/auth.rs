//! Credentials from docker's config file, and `WWW-Authenticate` challenges. Parsing is pure.

use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::error::{Error, Result};

/// A user and password for one registry, and the file they came from.
#[derive(Clone)]
pub(crate) struct Credentials {
    pub(crate) user: String,
    pub(crate) password: String,
    pub(crate) source: PathBuf,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("source", &self.source)
            .finish()
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic …` header.
    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.user, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// The credentials for `registry` from the docker config at `path`, as docker finds them: the
/// credential helper `credHelpers.<registry>` names, else the one `credsStore` names (each run
/// as `docker-credential-<name> get`), else `auths.<registry>.auth`. `None` when the file is
/// missing or has none for the registry.
pub(crate) fn load(path: &Path, registry: &str) -> Result<Option<Credentials>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(Error::DockerConfig {
                path: path.to_owned(),
                reason: err.to_string(),
            });
        }
    };
    let found = parse_config(&text, registry).map_err(|reason| Error::DockerConfig {
        path: path.to_owned(),
        reason,
    })?;
    let (user, password) = match found {
        None => return Ok(None),
        Some(Found::Basic { user, password }) => (user, password),
        Some(Found::Helper(helper)) => match run_helper(&helper, registry)? {
            Some(pair) => pair,
            None => return Ok(None),
        },
    };
    Ok(Some(Credentials {
        user,
        password,
        source: path.to_owned(),
    }))
}

/// Where a docker config keeps a registry's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    /// In the file: `auths.<registry>.auth`.
    Basic { user: String, password: String },
    /// With a credential helper: `docker-credential-<name>`.
    Helper(String),
}

/// Run `docker-credential-<helper> get` with `registry` on its stdin, as docker does; the user
/// and secret it prints, or `None` when it has none for the registry.
fn run_helper(helper: &str, registry: &str) -> Result<Option<(String, String)>> {
    use std::io::Write as _;
    let program = format!("docker-credential-{helper}");
    let failed = |reason: String| Error::CredentialHelper {
        program: program.clone(),
        registry: registry.to_owned(),
        reason,
    };
    // Docker Hub's credentials are kept under its old v1 address.
    let server = if registry == "docker.io" {
        "https://index.docker.io/v1/"
    } else {
        registry
    };
    let mut child = std::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|err| failed(format!("cannot run it ({err})")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading says why on its outputs.
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|err| failed(err.to_string()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // docker-credential-helpers' "credentials not found in native keychain".
        if stdout.contains("credentials not found") {
            return Ok(None);
        }
        let said = format!(
            "{} {}",
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return Err(failed(format!(
            "it failed ({}): {}",
            out.status,
            said.trim()
        )));
    }
    let value: serde_json::Value = serde_json::from_str(&stdout)
        .map_err(|err| failed(format!("it printed no JSON ({err})")))?;
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    match (field("Username"), field("Secret")) {
        (Some(user), Some(secret)) => Ok(Some((user, secret))),
        _ => Err(failed("it printed no Username and Secret".to_owned())),
    }
}

/// Where the docker config `text` keeps `registry`'s credentials: `credHelpers.<registry>`,
/// else `credsStore`, else `auths.<registry>.auth` (base64 of `user:password`). Keys may carry a
/// scheme and a path (`https://index.docker.io/v1/`); Docker Hub (`docker.io`) also matches
/// `index.docker.io` and `registry-1.docker.io`.
fn parse_config(text: &str, registry: &str) -> std::result::Result<Option<Found>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|err| format!("it is not JSON ({err})"))?;
    let wanted = |key: &str| {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("");
        host.eq_ignore_ascii_case(registry)
            || (registry == "docker.io"
                && matches!(host, "index.docker.io" | "registry-1.docker.io"))
    };
    let helper = value
        .get("credHelpers")
        .and_then(|h| h.as_object())
        .and_then(|helpers| helpers.iter().find(|(key, _)| wanted(key)))
        .and_then(|(_, name)| name.as_str())
        .or_else(|| value.get("credsStore").and_then(|s| s.as_str()))
        .filter(|name| !name.is_empty());
    if let Some(name) = helper {
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(format!(
                "credential helper name {name:?} is not a plain name"
            ));
        }
        return Ok(Some(Found::Helper(name.to_owned())));
    }
    let Some(auths) = value.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    let Some((key, entry)) = auths.iter().find(|(key, _)| wanted(key)) else {
        return Ok(None);
    };
    let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| format!("auths.{key:?}.auth is not base64"))?;
    let decoded = String::from_utf8(decoded)
        .map_err(|_| format!("auths.{key:?}.auth is not base64 of UTF-8 text"))?;
    let Some((user, password)) = decoded.split_once(':') else {
        return Err(format!("auths.{key:?}.auth is not base64 of user:password"));
    };
    Ok(Some(Found::Basic {
        user: user.to_owned(),
        password: password.to_owned(),
    }))
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Parse the challenge of a 401 answer: `Basic realm="…"` or
/// `Bearer realm="…",service="…",scope="…"` (quoted values may hold commas).
pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(params);
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    Some(Challenge::Bearer {
        realm: get("realm")?,
        service: get("service"),
    })
}

/// `k="v", k2=v2` into pairs.
fn parse_params(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.next().is_none() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key.trim().to_owned(), value.trim().to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_basic_credentials_from_docker_config() {
        let basic = |user: &str, password: &str| {
            Some(Found::Basic {
                user: user.into(),
                password: password.into(),
            })
        };
        // base64("ann:s3:cret")
        let text = r#"{"auths":{"https://localhost:5000/v1/":{"auth":"YW5uOnMzOmNyZXQ="},
                       "other:1":{"auth":"eDp5"}}}"#;
        assert_eq!(
            parse_config(text, "localhost:5000").unwrap(),
            basic("ann", "s3:cret")
        );
        assert_eq!(parse_config(text, "localhost:5001").unwrap(), None);
        let hub = r#"{"auths":{"https://index.docker.io/v1/":{"auth":"eDp5"}}}"#;
        assert_eq!(parse_config(hub, "docker.io").unwrap(), basic("x", "y"));
        assert_eq!(parse_config("{}", "docker.io").unwrap(), None);
        assert!(parse_config("nope", "a").is_err());
        assert!(parse_config(r#"{"auths":{"a":{"auth":"!!"}}}"#, "a").is_err());
        assert!(parse_config(r#"{"auths":{"a":{"auth":"eHk="}}}"#, "a").is_err());
    }

    #[test]
    fn credential_helpers_come_first_as_in_docker() {
        let text = r#"{"auths":{"a:1":{"auth":"eDp5"},"b:1":{}},"credsStore":"desktop",
                       "credHelpers":{"ghcr.io":"gh","b:1":"pass"}}"#;
        let helper = |name: &str| Some(Found::Helper(name.into()));
        assert_eq!(parse_config(text, "ghcr.io").unwrap(), helper("gh"));
        assert_eq!(parse_config(text, "b:1").unwrap(), helper("pass"));
        // credsStore keeps every other registry's credentials, as in docker.
        assert_eq!(parse_config(text, "a:1").unwrap(), helper("desktop"));
        assert!(parse_config(r#"{"credsStore":"../x"}"#, "a").is_err());
    }

    #[test]
    fn parses_challenges() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/x:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"bearer realm=https://ghcr.io/token"#),
            Some(Challenge::Bearer {
                realm: "https://ghcr.io/token".into(),
                service: None
            })
        );
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
        assert_eq!(parse_challenge("Negotiate abc"), None);
    }
}
