//! `REGISTRY/REPOSITORY:TAG`: where a snapshot lives in a registry. Parsing is pure.

use crate::error::{Error, Result};

/// A parsed `REGISTRY/REPOSITORY:TAG`, e.g. `localhost:5000/repl:warm` or
/// `ghcr.io/me/pf/repl:v1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: String,
}

impl Reference {
    /// Parse a reference. The registry host is required (pf has no default registry): the part
    /// before the first `/` when it holds a `.` or a `:`, or is `localhost`. `docker.io` means
    /// Docker Hub, where a one-part repository is under `library/`.
    pub fn parse(text: &str) -> Result<Self> {
        let invalid = |reason| Error::InvalidReference {
            reference: text.to_owned(),
            reason,
        };
        if let Some((scheme, _)) = text.split_once("://") {
            return Err(invalid(if scheme == "http" {
                "leave out http://: write REGISTRY/REPOSITORY:TAG; a loopback registry is plain http by itself, and --insecure allows plain http to others"
            } else {
                "leave out the scheme: write REGISTRY/REPOSITORY:TAG (https is the default)"
            }));
        }
        let Some((registry, rest)) = text.split_once('/') else {
            return Err(invalid(
                "write REGISTRY/REPOSITORY:TAG, e.g. localhost:5000/repl:warm",
            ));
        };
        if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            return Err(invalid(
                "it names no registry host first; write REGISTRY/REPOSITORY:TAG, e.g. localhost:5000/repl:warm or ghcr.io/USER/repl:warm",
            ));
        }
        if registry
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
            || registry.contains('@')
        {
            return Err(invalid("the registry host is not a host[:port]"));
        }
        if rest.contains('@') {
            return Err(invalid(
                "pf names snapshots in registries by tag, not by digest; write REGISTRY/REPOSITORY:TAG",
            ));
        }
        let Some((repository, tag)) = rest.rsplit_once(':') else {
            return Err(invalid("it has no tag; add one, e.g. …/repl:warm"));
        };
        if repository.is_empty() || !repository.split('/').all(valid_component) {
            return Err(invalid(
                "a repository is lowercase letters and digits, separated by '.', '_', '-' or '/'",
            ));
        }
        if repository.len() > 255 {
            return Err(invalid("the repository is longer than 255 bytes"));
        }
        if !valid_tag(tag) {
            return Err(invalid(
                "a tag is 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'",
            ));
        }
        let mut repository = repository.to_owned();
        if registry == "docker.io" && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        Ok(Self {
            registry: registry.to_owned(),
            repository,
            tag: tag.to_owned(),
        })
    }

    /// The registry as written (`host[:port]`), which also keys its credentials.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path, e.g. `me/pf/repl`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The host the API is at: Docker Hub's is not `docker.io`.
    pub(crate) fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// Whether the registry is on a loopback address (`localhost`, `127.0.0.0/8`, `[::1]`).
    pub(crate) fn is_loopback(&self) -> bool {
        let host = host_of(&self.registry);
        if host.eq_ignore_ascii_case("localhost") || host == "::1" {
            return true;
        }
        host.parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}:{}", self.registry, self.repository, self.tag)
    }
}

/// The host of `host[:port]` or `[v6]:port`, without brackets or port.
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

/// One path component of a repository: `[a-z0-9]+` runs joined by `.`, `_`, `__` or `-`s.
fn valid_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
        && bytes
            .iter()
            .all(|b| alnum(b) || matches!(b, b'.' | b'_' | b'-'))
        && !c.contains("..")
        && !c.contains("___")
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn valid_tag(t: &str) -> bool {
    let bytes = t.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_registry_repository_and_tag() {
        let r = Reference::parse("localhost:5000/team/repl:warm-1").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("localhost:5000", "team/repl", "warm-1")
        );
        assert!(r.is_loopback());
        assert_eq!(r.to_string(), "localhost:5000/team/repl:warm-1");
        let r = Reference::parse("ghcr.io/me/pf/repl:v1").unwrap();
        assert_eq!(r.repository(), "me/pf/repl");
        assert!(!r.is_loopback());
        let r = Reference::parse("docker.io/repl:v1").unwrap();
        assert_eq!(
            (r.api_host(), r.repository()),
            ("registry-1.docker.io", "library/repl")
        );
        for loopback in ["127.0.0.1:5000", "127.3.2.1", "[::1]:5000", "LOCALHOST:1"] {
            assert!(
                Reference::parse(&format!("{loopback}/a:b"))
                    .unwrap()
                    .is_loopback()
            );
        }
        assert!(
            !Reference::parse("128.0.0.1:5000/a:b")
                .unwrap()
                .is_loopback()
        );
        assert!(
            !Reference::parse("localhost.evil.com/a:b")
                .unwrap()
                .is_loopback()
        );
    }

    #[test]
    fn refuses_what_is_not_a_reference() {
        for bad in [
            "repl:warm",
            "me/repl:warm",
            "localhost:5000/repl",
            "localhost:5000/Repl:x",
            "localhost:5000/:x",
            "localhost:5000/a//b:x",
            "localhost:5000/a:-x",
            "localhost:5000/a:x y",
            "localhost:5000/a@sha256:00",
            "local host:5000/a:b",
        ] {
            assert!(
                matches!(Reference::parse(bad), Err(Error::InvalidReference { .. })),
                "{bad}"
            );
        }
        // A URL is told to drop its scheme, not that its repository is malformed.
        for (url, says) in [
            ("http://127.0.0.1:5000/goblins/b:v1", "leave out http://"),
            ("https://ghcr.io/me/repl:v1", "leave out the scheme"),
        ] {
            let err = Reference::parse(url).expect_err(url).to_string();
            assert!(err.contains(says), "{url}: {err}");
        }
    }
}
