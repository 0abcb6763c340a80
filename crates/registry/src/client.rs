//! The distribution API over blocking HTTP: `/v2/` ping, auth (basic and bearer token), blobs
//! (HEAD, chunked or monolithic upload, GET), manifests and tags.

use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pf_core::Digest256;
use ureq::http::{Method, Request, Response};
use ureq::tls::{RootCerts, TlsConfig, TlsProvider};
use ureq::{Agent, Body};

use crate::auth::{self, Challenge, Credentials};
use crate::error::{Error, Result};
use crate::manifest::{UPLOAD_SESSION_KIND, UploadSession};
use crate::reference::Reference;
use crate::resume::Sessions;
use crate::{ConnectOptions, Event, Progress};

/// Blobs up to this size go up in one PUT; larger ones in PATCH chunks of this size. Memory per
/// upload in flight is one chunk.
pub(crate) const CHUNK: usize = 8 << 20;
/// The manifest media types pf asks for.
const ACCEPT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The most of an error body pf reads to explain a failure.
const DETAIL_LIMIT: u64 = 64 * 1024;

/// What a client will do in the repository, for the token's scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Pull,
    Push,
}

impl Access {
    fn actions(self) -> &'static str {
        match self {
            Self::Pull => "pull",
            Self::Push => "pull,push",
        }
    }
    fn verb(self) -> &'static str {
        match self {
            Self::Pull => "pull",
            Self::Push => "push",
        }
    }
}

/// One repository of one registry, authenticated.
#[derive(Debug)]
pub(crate) struct Client {
    agent: Agent,
    base: String,
    registry: String,
    repository: String,
    access: Access,
    credentials: Option<Credentials>,
    config: Option<PathBuf>,
    /// The `Authorization` header value, once a challenge asked for one.
    authorization: Mutex<Option<String>>,
    /// How long a connection may move nothing (see [`ConnectOptions::idle_timeout`]).
    idle: Duration,
}

impl Client {
    /// Reach the registry, check that it is one (`GET /v2/`), and authenticate when it asks.
    pub(crate) fn connect(
        reference: &Reference,
        options: &ConnectOptions,
        access: Access,
    ) -> Result<Self> {
        let scheme = if reference.is_loopback() || options.insecure {
            "http"
        } else {
            "https"
        };
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::PlatformVerifier)
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .build();
        let config = Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls)
            .timeout_connect(Some(Duration::from_secs(15)))
            // Idle, not total: every read and write of the connection (the answer's head, a
            // blob's body either way) may wait this long for a byte, and a transfer that keeps
            // moving goes on however long it takes.
            .timeout_per_read(Some(options.idle_timeout))
            .timeout_per_write(Some(options.idle_timeout))
            .max_redirects(10)
            .user_agent(concat!("pf/", env!("CARGO_PKG_VERSION")))
            .build();
        let credentials = match &options.docker_config {
            Some(path) => auth::load(path, reference.registry())?,
            None => None,
        };
        let client = Self {
            agent: config.into(),
            base: format!("{scheme}://{}", reference.api_host()),
            registry: reference.registry().to_owned(),
            repository: reference.repository().to_owned(),
            access,
            credentials,
            config: options.docker_config.clone(),
            authorization: Mutex::new(None),
            idle: options.idle_timeout,
        };
        client.ping()?;
        Ok(client)
    }

    /// The error of a first request that failed at the transport level: a TLS certificate the
    /// system does not trust, or an answer that is not TLS, each said with its fix; else
    /// [`Error::Unreachable`].
    fn unreachable(&self, url: &str, source: ureq::Error) -> Error {
        let tls = match &source {
            ureq::Error::Rustls(err) => Some(err),
            ureq::Error::Io(err) => err
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
            _ => None,
        };
        match tls {
            Some(rustls::Error::InvalidCertificate(reason)) => Error::UntrustedCertificate {
                registry: self.registry.clone(),
                reason: reason.to_string(),
            },
            Some(rustls::Error::InvalidMessage(_)) => Error::NotTls {
                registry: self.registry.clone(),
            },
            _ => Error::Unreachable {
                url: url.to_owned(),
                source: Box::new(source),
            },
        }
    }

    /// `GET /v2/`: a registry answers 200, or 401 with a challenge.
    fn ping(&self) -> Result<()> {
        let url = format!("{}/v2/", self.base);
        let request = Request::get(&url)
            .body(())
            .map_err(|e| http_error(&url, e))?;
        let mut response = self
            .agent
            .run(request)
            .map_err(|source| self.unreachable(&url, source))?;
        match response.status().as_u16() {
            200 => {
                let versioned = response
                    .headers()
                    .get("docker-distribution-api-version")
                    .is_some();
                let body = read_detail(&mut response);
                let json = body
                    .as_deref()
                    .is_some_and(|b| serde_json::from_str::<serde_json::Value>(b).is_ok());
                if versioned || json {
                    Ok(())
                } else {
                    Err(Error::NotARegistry {
                        url,
                        status: 200,
                        detail: Some("not the JSON a registry answers".into()),
                    })
                }
            }
            401 => {
                let challenge = header(&response, "www-authenticate");
                self.authenticate(challenge.as_deref())?;
                let response = self.request(Method::GET, &url, &[], None)?;
                match response.status().as_u16() {
                    200 => Ok(()),
                    status => Err(self.status_error("GET", &url, status, response)),
                }
            }
            status => Err(Error::NotARegistry {
                url,
                status,
                detail: None,
            }),
        }
    }

    /// Answer a 401's challenge: basic credentials, or a token from the bearer realm.
    fn authenticate(&self, challenge: Option<&str>) -> Result<()> {
        let parsed = challenge.and_then(auth::parse_challenge);
        let value = match parsed {
            Some(Challenge::Basic) => match &self.credentials {
                Some(creds) => creds.basic_header(),
                None => return Err(self.credentials_needed()),
            },
            Some(Challenge::Bearer { realm, service }) => self.token(&realm, service.as_deref())?,
            None => {
                return Err(Error::UnknownChallenge {
                    registry: self.registry.clone(),
                    challenge: challenge.unwrap_or("(none)").to_owned(),
                });
            }
        };
        *self.authorization.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
        Ok(())
    }

    /// The bearer flow: GET the realm with service and scope (and basic credentials if any).
    fn token(&self, realm: &str, service: Option<&str>) -> Result<String> {
        if self.base.starts_with("https://") && !realm.starts_with("https://") {
            return Err(Error::InsecureRealm {
                registry: self.registry.clone(),
                realm: realm.to_owned(),
            });
        }
        let scope = format!("repository:{}:{}", self.repository, self.access.actions());
        let mut url = format!("{realm}?scope={}", query_escape(&scope));
        if let Some(service) = service {
            url.push_str(&format!("&service={}", query_escape(service)));
        }
        let mut builder = Request::get(&url);
        if let Some(creds) = &self.credentials {
            builder = builder.header("Authorization", creds.basic_header());
        }
        let request = builder.body(()).map_err(|e| http_error(&url, e))?;
        let mut response = self.agent.run(request).map_err(|source| Error::Transport {
            method: "GET",
            url: realm.to_owned(),
            source: Box::new(source),
        })?;
        let status = response.status().as_u16();
        if status == 401 || status == 403 {
            return Err(match &self.credentials {
                Some(creds) => self.credentials_refused(creds),
                None => self.credentials_needed(),
            });
        }
        let body = read_detail(&mut response);
        if status != 200 {
            return Err(Error::Token {
                realm: realm.to_owned(),
                registry: self.registry.clone(),
                status,
                detail: body,
            });
        }
        let token = body
            .as_deref()
            .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
            .and_then(|v| {
                v.get("token")
                    .or_else(|| v.get("access_token"))
                    .and_then(|t| t.as_str())
                    .map(str::to_owned)
            })
            .ok_or_else(|| Error::Token {
                realm: realm.to_owned(),
                registry: self.registry.clone(),
                status,
                detail: Some("the answer holds no token".into()),
            })?;
        Ok(format!("Bearer {token}"))
    }

    fn credentials_needed(&self) -> Error {
        Error::CredentialsNeeded {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            config: self.config.clone(),
        }
    }

    fn credentials_refused(&self, creds: &Credentials) -> Error {
        Error::CredentialsRefused {
            registry: self.registry.clone(),
            user: creds.user.clone(),
            config: creds.source.clone(),
        }
    }

    /// Send a request with the current authorization; on a 401, answer the challenge once and
    /// send it again. A second 401 is an auth error.
    fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response<Body>> {
        let mut answered = false;
        loop {
            let mut builder = Request::builder().method(method.clone()).uri(url);
            for (name, value) in headers {
                builder = builder.header(*name, *value);
            }
            let authorization = self
                .authorization
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            // Only to the registry itself: an upload Location may name another host.
            if let Some(value) = authorization.filter(|_| self.is_registry_url(url)) {
                builder = builder.header("Authorization", value);
            }
            let result = match body {
                Some(bytes) => builder
                    .body(bytes)
                    .map_err(|e| http_error(url, e))
                    .map(|r| {
                        // Once the body's last byte is written, up to a send buffer of it is
                        // still on its way, and nothing pf can see moves until the answer:
                        // the wait for it allows the idle timeout plus that tail's time at a
                        // slow link's pace.
                        self.agent
                            .configure_request(r)
                            .timeout_per_read(None)
                            .timeout_recv_response(Some(answer_wait(self.idle, bytes.len())))
                            .timeout_recv_body(Some(self.idle))
                            .build()
                    })
                    .and_then(|r| self.agent.run(r).map_err(|e| transport(&method, url, e))),
                None => builder
                    .body(())
                    .map_err(|e| http_error(url, e))
                    .and_then(|r| self.agent.run(r).map_err(|e| transport(&method, url, e))),
            };
            let response = result?;
            if response.status().as_u16() != 401 {
                return Ok(response);
            }
            if answered {
                return Err(match &self.credentials {
                    Some(creds) => self.credentials_refused(creds),
                    None => self.credentials_needed(),
                });
            }
            answered = true;
            let challenge = header(&response, "www-authenticate");
            self.authenticate(challenge.as_deref())?;
        }
    }

    /// The error for an unexpected status, with the registry's own error code and message.
    fn status_error(
        &self,
        method: &'static str,
        url: &str,
        status: u16,
        mut response: Response<Body>,
    ) -> Error {
        let detail = read_detail(&mut response).map(|b| explain_body(&b));
        if status == 403 {
            return Error::Denied {
                registry: self.registry.clone(),
                repository: self.repository.clone(),
                action: self.access.verb(),
                detail,
            };
        }
        if status == 401 {
            return self.credentials_needed();
        }
        Error::Status {
            method,
            url: url.to_owned(),
            status,
            detail,
        }
    }

    fn blob_url(&self, digest: &Digest256) -> String {
        format!("{}/v2/{}/blobs/{digest}", self.base, self.repository)
    }

    /// Whether the repository holds the blob (`HEAD`).
    pub(crate) fn has_blob(&self, digest: &Digest256) -> Result<bool> {
        let url = self.blob_url(digest);
        let response = self.request(Method::HEAD, &url, &[], None)?;
        match response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            status => Err(self.status_error("HEAD", &url, status, response)),
        }
    }

    /// Forget the upload session `sessions` keeps for `digest`, if any: the registry has the
    /// blob (an earlier push was cut off after the registry committed it, before the session
    /// was removed, or the blob arrived by another push), so nothing will continue it.
    pub(crate) fn forget_upload(&self, sessions: &Sessions, digest: &Digest256) {
        sessions.remove(&self.base, &self.repository, digest);
    }

    /// Upload a blob of `size` raw bytes read from `reader`: one PUT up to [`CHUNK`], PATCH
    /// chunks and a closing PUT beyond. The registry checks the digest when it commits. A
    /// connection idle for the idle timeout is [`Error::Stalled`]. With `sessions`, a chunked
    /// upload is kept there after every acknowledged chunk, and one kept by an earlier run is
    /// continued from the offset the registry reports. Returns the bytes sent.
    pub(crate) fn upload(
        &self,
        digest: &Digest256,
        size: u64,
        reader: &mut dyn Read,
        sessions: Option<&Sessions>,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let sent = if size <= CHUNK as u64 {
            self.upload_whole(digest, size, reader, progress)
        } else {
            self.upload_chunked(digest, size, reader, sessions, progress)
        };
        sent.map_err(|err| self.stalled(err, digest, "uploading"))
    }

    /// POST for a new upload session; its location.
    fn start_upload(&self) -> Result<String> {
        let start = format!("{}/v2/{}/blobs/uploads/", self.base, self.repository);
        let response = self.request(Method::POST, &start, &[], Some(&[]))?;
        self.expect_location("POST", &start, 202, response)
    }

    /// A small blob in one PUT.
    fn upload_whole(
        &self,
        digest: &Digest256,
        size: u64,
        reader: &mut dyn Read,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let location = self.start_upload()?;
        let mut buf = vec![0u8; usize::try_from(size).unwrap_or(CHUNK).min(CHUNK)];
        let read_local = |source| Error::ReadLocal {
            digest: *digest,
            source,
        };
        let n = fill(reader, &mut buf).map_err(read_local)?;
        // The reader must end here: reading on checks the digest at its end.
        if n as u64 != size || fill(reader, &mut [0u8; 1]).map_err(read_local)? != 0 {
            return Err(read_local(std::io::Error::other(
                "the blob's size changed while it was read",
            )));
        }
        let url = with_digest(&location, digest);
        let response = self.request(
            Method::PUT,
            &url,
            &[("Content-Type", "application/octet-stream")],
            Some(&buf[..n]),
        )?;
        self.expect_status("PUT", &url, 201, response)?;
        progress(Event::Transferred { bytes: n as u64 });
        Ok(n as u64)
    }

    /// A large blob in PATCH chunks, continuing a kept session when the registry still knows
    /// it. A session the registry refuses or lost is forgotten and the upload starts afresh; one
    /// cut off by the network or a dead registry stays for the next run.
    fn upload_chunked(
        &self,
        digest: &Digest256,
        size: u64,
        reader: &mut dyn Read,
        sessions: Option<&Sessions>,
        progress: Progress<'_>,
    ) -> Result<u64> {
        let resumed = match sessions
            .and_then(|s| s.load(&self.base, &self.repository, digest, size))
        {
            Some(saved) => {
                let status = self.upload_status(&saved.location, size)?;
                if status.is_none() {
                    tracing::info!(%digest, "the registry no longer knows the upload; starting afresh");
                }
                status
            }
            None => None,
        };
        let (mut location, mut offset) = match resumed {
            Some((location, offset)) => {
                tracing::info!(%digest, offset, "continuing the upload");
                (location, offset)
            }
            None => (self.start_upload()?, 0),
        };
        let read_local = |source| Error::ReadLocal {
            digest: *digest,
            source,
        };
        if offset > 0 {
            // The registry has these: read past them (the reader checks the digest at its end).
            let skipped = std::io::copy(&mut reader.take(offset), &mut std::io::sink())
                .map_err(read_local)?;
            if skipped != offset {
                return Err(read_local(std::io::Error::other(
                    "the blob is shorter than the registry's part of it",
                )));
            }
        }
        let keep = |location: &str, offset: u64| match sessions {
            Some(sessions) => sessions.save(&UploadSession {
                kind: UPLOAD_SESSION_KIND.to_owned(),
                registry: self.base.clone(),
                repository: self.repository.clone(),
                digest: *digest,
                size,
                location: location.to_owned(),
                offset,
            }),
            None => Ok(()),
        };
        let forget = || {
            if let Some(sessions) = sessions {
                sessions.remove(&self.base, &self.repository, digest);
            }
        };
        keep(&location, offset)?;
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        let outcome = (|| {
            loop {
                let n = fill(reader, &mut buf).map_err(read_local)?;
                if n == 0 {
                    break;
                }
                let range = format!("{}-{}", offset, offset + n as u64 - 1);
                let response = self.request(
                    Method::PATCH,
                    &location,
                    &[
                        ("Content-Type", "application/octet-stream"),
                        ("Content-Range", &range),
                    ],
                    Some(&buf[..n]),
                )?;
                location = self.expect_location("PATCH", &location, 202, response)?;
                offset += n as u64;
                sent += n as u64;
                keep(&location, offset)?;
                progress(Event::Transferred { bytes: n as u64 });
            }
            let url = with_digest(&location, digest);
            let response = self.request(Method::PUT, &url, &[], Some(&[]))?;
            self.expect_status("PUT", &url, 201, response)
        })();
        match outcome {
            Ok(()) => {
                forget();
                Ok(sent)
            }
            // Cut off: the session stays for the next run.
            Err(err @ (Error::Transport { .. } | Error::ReadLocal { .. })) => Err(err),
            // The registry refused it: a next run starts afresh.
            Err(err) => {
                forget();
                Err(err)
            }
        }
    }

    /// Where an upload session stands (`GET` on its location): the location to continue at
    /// and how many bytes the registry holds, from its `Range: 0-<last byte>`; `None` when the
    /// registry no longer knows or refuses the session, or reports nothing usable.
    fn upload_status(&self, location: &str, size: u64) -> Result<Option<(String, u64)>> {
        let response = self.request(Method::GET, location, &[], None)?;
        let status = response.status().as_u16();
        if status != 204 && status != 200 {
            tracing::debug!(status, "upload status refused");
            return Ok(None);
        }
        let range = header(&response, "range");
        let next = header(&response, "location");
        // `0-0` is ambiguous (no byte, or one): not worth a guess.
        let held = range
            .as_deref()
            .and_then(parse_upload_range)
            .filter(|&held| held > 1 && held <= size);
        let Some(held) = held else {
            return Ok(None);
        };
        let location = match next {
            Some(next) => self.absolute(next),
            None => location.to_owned(),
        };
        Ok(Some((location, held)))
    }

    /// Store a manifest under a tag; the registry's digest of it, when it says.
    pub(crate) fn put_manifest(&self, tag: &str, bytes: &[u8]) -> Result<Option<String>> {
        let url = format!("{}/v2/{}/manifests/{tag}", self.base, self.repository);
        let response = self.request(
            Method::PUT,
            &url,
            &[("Content-Type", ACCEPT_MANIFEST)],
            Some(bytes),
        )?;
        let digest = header(&response, "docker-content-digest");
        self.expect_status("PUT", &url, 201, response)?;
        Ok(digest)
    }

    /// The manifest a tag names, and its media type. A missing tag is told apart from a missing
    /// repository by the repository's tag list.
    pub(crate) fn get_manifest(&self, tag: &str) -> Result<(Vec<u8>, Option<String>)> {
        let url = format!("{}/v2/{}/manifests/{tag}", self.base, self.repository);
        let mut response = self.request(Method::GET, &url, &[("Accept", ACCEPT_MANIFEST)], None)?;
        match response.status().as_u16() {
            200 => {
                let media_type = header(&response, "content-type");
                let bytes = response
                    .body_mut()
                    .with_config()
                    .limit(4 << 20)
                    .read_to_vec()
                    .map_err(|e| transport(&Method::GET, &url, e))?;
                Ok((bytes, media_type))
            }
            404 => Err(match self.tags()? {
                None => Error::RepositoryNotFound {
                    registry: self.registry.clone(),
                    repository: self.repository.clone(),
                },
                Some(tags) => Error::TagNotFound {
                    registry: self.registry.clone(),
                    repository: self.repository.clone(),
                    tag: tag.to_owned(),
                    tags,
                },
            }),
            status => Err(self.status_error("GET", &url, status, response)),
        }
    }

    /// The repository's tags; `None` when the registry does not know the repository.
    fn tags(&self) -> Result<Option<Vec<String>>> {
        let url = format!("{}/v2/{}/tags/list", self.base, self.repository);
        let mut response = self.request(Method::GET, &url, &[], None)?;
        match response.status().as_u16() {
            200 => {
                let value: serde_json::Value = response
                    .body_mut()
                    .with_config()
                    .limit(4 << 20)
                    .read_to_string()
                    .ok()
                    .and_then(|text| serde_json::from_str(&text).ok())
                    .unwrap_or(serde_json::Value::Null);
                let tags = value
                    .get("tags")
                    .and_then(|t| t.as_array())
                    .map(|t| {
                        t.iter()
                            .filter_map(|t| t.as_str().map(str::to_owned))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                // A repository with no tags is one nobody can pull from.
                Ok(if tags.is_empty() { None } else { Some(tags) })
            }
            404 => Ok(None),
            status => Err(self.status_error("GET", &url, status, response)),
        }
    }

    /// A reader over a blob's bytes (unverified: the caller verifies).
    pub(crate) fn get_blob(&self, digest: &Digest256) -> Result<(impl Read + use<>, String)> {
        let url = self.blob_url(digest);
        let response = self
            .request(Method::GET, &url, &[], None)
            .map_err(|err| self.stalled(err, digest, "downloading"))?;
        match response.status().as_u16() {
            200 => Ok((response.into_body().into_reader(), url)),
            status => Err(self.status_error("GET", &url, status, response)),
        }
    }

    /// `err` as [`Error::Stalled`] when it is the idle timeout of a connection moving `digest`
    /// (`action` is "uploading" or "downloading"); any other error as it is.
    pub(crate) fn stalled(&self, err: Error, digest: &Digest256, action: &'static str) -> Error {
        let idle = match &err {
            Error::Transport { source, .. } => is_idle_timeout(source),
            Error::BodyRead { source, .. } => io_is_idle_timeout(source),
            _ => false,
        };
        if !idle {
            return err;
        }
        let source = match err {
            Error::Transport { source, .. } => source.into_io(),
            Error::BodyRead { source, .. } => source,
            _ => unreachable!("matched above"),
        };
        Error::Stalled {
            registry: self.registry.clone(),
            action,
            digest: *digest,
            idle: self.idle,
            source,
        }
    }

    fn expect_status(
        &self,
        method: &'static str,
        url: &str,
        want: u16,
        response: Response<Body>,
    ) -> Result<()> {
        let status = response.status().as_u16();
        if status == want {
            return Ok(());
        }
        Err(self.status_error(method, url, status, response))
    }

    /// Whether `url` is on the registry itself (same scheme, host and port), where its
    /// credentials may go.
    fn is_registry_url(&self, url: &str) -> bool {
        same_origin(&self.base, url)
    }

    /// Check the status and return the (absolute) `Location` an upload continues at.
    fn expect_location(
        &self,
        method: &'static str,
        url: &str,
        want: u16,
        response: Response<Body>,
    ) -> Result<String> {
        let location = header(&response, "location");
        self.expect_status(method, url, want, response)?;
        let Some(location) = location else {
            return Err(Error::Status {
                method,
                url: url.to_owned(),
                status: want,
                detail: Some("the answer has no Location header".into()),
            });
        };
        Ok(self.absolute(location))
    }

    /// A `Location` made absolute against the registry's base.
    fn absolute(&self, location: String) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location
        } else if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            format!("{}/{location}", self.base)
        }
    }
}

/// The bytes an upload holds from its `Range: 0-<last byte>` (`0-0` gives 1).
fn parse_upload_range(range: &str) -> Option<u64> {
    let (first, last) = range.trim().split_once('-')?;
    if first.trim() != "0" {
        return None;
    }
    last.trim().parse::<u64>().ok()?.checked_add(1)
}

/// Whether `url` starts with `base` (`scheme://host[:port]`) and goes on with a path, a query
/// or nothing: `http://h:5000/v2` is on `http://h:5000`, `http://h:50001/` and
/// `http://h:5000.evil/` are not.
fn same_origin(base: &str, url: &str) -> bool {
    url.strip_prefix(base)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
}

fn header(response: &Response<Body>, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Up to [`DETAIL_LIMIT`] bytes of a body, as text.
fn read_detail(response: &mut Response<Body>) -> Option<String> {
    let text = response
        .body_mut()
        .with_config()
        .limit(DETAIL_LIMIT)
        .read_to_string()
        .ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// The registry's `{"errors":[{"code","message"}]}` as `CODE: message`, else the text cut short.
pub(crate) fn explain_body(body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let first = parsed
        .as_ref()
        .and_then(|v| v.get("errors"))
        .and_then(|e| e.as_array())
        .and_then(|e| e.first());
    if let Some(err) = first {
        let code = err.get("code").and_then(|c| c.as_str()).unwrap_or("");
        let message = err.get("message").and_then(|m| m.as_str()).unwrap_or("");
        return format!("{code}: {message}");
    }
    let one_line: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    one_line.chars().take(200).collect()
}

fn transport(method: &Method, url: &str, source: ureq::Error) -> Error {
    let method = match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        _ => "request",
    };
    Error::Transport {
        method,
        url: without_query(url).to_owned(),
        source: Box::new(source),
    }
}

/// The most of a request body the kernel may still hold when its last byte is written (Linux's
/// default `net.core.wmem_max`).
const IN_FLIGHT: u64 = 4 << 20;
/// The slowest pace at which an upload's tail is still waited for.
const SLOW_LINK: u64 = 32 << 10;

/// How long the answer to a request with a `len`-byte body may take once the body is written:
/// the idle timeout plus the bytes still in flight at [`SLOW_LINK`] bytes a second.
fn answer_wait(idle: Duration, len: usize) -> Duration {
    idle + Duration::from_secs((len as u64).min(IN_FLIGHT) / SLOW_LINK)
}

/// Whether a transport error is a connection's idle timeout: a read or a write waited too long,
/// or the answer to an upload did not come within [`answer_wait`] (the only total timeouts pf
/// sets).
fn is_idle_timeout(err: &ureq::Error) -> bool {
    matches!(
        err,
        ureq::Error::Timeout(
            ureq::Timeout::PerRead
                | ureq::Timeout::PerWrite
                | ureq::Timeout::RecvResponse
                | ureq::Timeout::RecvBody
        )
    )
}

/// Whether an I/O error of a body reader is a connection's idle timeout.
fn io_is_idle_timeout(err: &std::io::Error) -> bool {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<ureq::Error>())
        .is_some_and(is_idle_timeout)
}

/// A URL without its query (an upload's `_state` is long and tells a user nothing).
fn without_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

fn http_error(url: &str, source: ureq::http::Error) -> Error {
    Error::Transport {
        method: "request",
        url: url.to_owned(),
        source: Box::new(ureq::Error::Http(source)),
    }
}

/// `location` with `digest=` added to its query.
fn with_digest(location: &str, digest: &Digest256) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}digest={digest}")
}

/// Percent-encode a query value.
fn query_escape(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Read until `buf` is full or the reader ends; how many bytes were read.
pub(crate) fn fill(reader: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explains_registry_errors() {
        assert_eq!(
            explain_body(
                r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry","detail":"x"}]}"#
            ),
            "BLOB_UNKNOWN: blob unknown to registry"
        );
        assert_eq!(
            explain_body("<html>\n<b>nope</b>\n</html>"),
            "<html> <b>nope</b> </html>"
        );
    }

    #[test]
    fn credentials_go_only_to_the_registry_itself() {
        let base = "https://r.example:5000";
        assert!(same_origin(
            base,
            "https://r.example:5000/v2/a/blobs/uploads/x?_state=1"
        ));
        assert!(same_origin(base, "https://r.example:5000"));
        assert!(!same_origin(base, "https://r.example:50001/v2/"));
        assert!(!same_origin(
            base,
            "https://r.example:5000.evil.example/v2/"
        ));
        assert!(!same_origin(base, "http://r.example:5000/v2/"));
        assert!(!same_origin(base, "https://storage.example/upload"));
    }

    #[test]
    fn an_uploads_answer_may_wait_for_its_tail_at_a_slow_pace() {
        let idle = Duration::from_secs(60);
        assert_eq!(answer_wait(idle, 0), idle);
        assert_eq!(answer_wait(idle, 1 << 20), idle + Duration::from_secs(32));
        // Never more than a send buffer is in flight.
        assert_eq!(answer_wait(idle, 8 << 20), idle + Duration::from_secs(128));
        let timeout = ureq::Error::Timeout(ureq::Timeout::PerRead);
        assert!(is_idle_timeout(&timeout));
        assert!(io_is_idle_timeout(&timeout.into_io()));
        assert!(!is_idle_timeout(&ureq::Error::Timeout(
            ureq::Timeout::Connect
        )));
    }

    #[test]
    fn reads_how_much_an_upload_holds() {
        assert_eq!(parse_upload_range("0-8388607"), Some(8 << 20));
        assert_eq!(parse_upload_range(" 0 - 9 "), Some(10));
        assert_eq!(parse_upload_range("0-0"), Some(1));
        assert_eq!(parse_upload_range("5-9"), None);
        assert_eq!(parse_upload_range("bytes=0-9x"), None);
    }

    #[test]
    fn adds_the_digest_to_an_upload_location() {
        let d = Digest256::of(b"x");
        assert_eq!(
            with_digest("http://h/u?_state=a", &d),
            format!("http://h/u?_state=a&digest={d}")
        );
        assert_eq!(
            with_digest("http://h/u", &d),
            format!("http://h/u?digest={d}")
        );
        assert_eq!(
            query_escape("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }
}
