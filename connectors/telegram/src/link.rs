//! A bot's own HTTP/1 connection to the Bot API for its poller's calls (getMe, then
//! getUpdates after getUpdates): opened at the first call, kept alive and reused for
//! every next one, driven inside the poller's task (hyper's `client::conn`, over TCP or
//! rustls).
//!
//! Why not the shared pooled client (`api::Api`, which `send` keeps using): an idle
//! Telegram channel is a long poll answered every 25 s, so 10,000 channels make ~400
//! round trips a second that carry nothing. Through the pool each one paid a checkout,
//! a request builder, response decoders and a hand-off to and from the connection's own
//! task; here it is one request written on a connection the poller already holds, and
//! the answer read in the same task. A long poll holds a connection for its whole
//! duration anyway, so a pool shares nothing between polls.
//!
//! A connection whose answer fails or times out is dropped, not reused: its state is
//! unknown. A call that fails on a reused connection (the server closed it while idle)
//! is tried once more on a fresh one, which is safe for the calls made here (getMe, and
//! getUpdates, which only confirms what its offset says).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use patchbay_connector_sdk::runtime::tokio;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::api::{ApiError, MAX_RESPONSE_BYTES, parse_answer};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A plain or TLS stream.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}
type Io = TokioIo<Box<dyn Stream>>;

/// Where the bot's calls go: parsed once from the API prefix.
#[derive(Clone)]
struct Target {
    tls: bool,
    host: String,
    port: u16,
    /// The `Host` header: the host, with the port when it is not the scheme's default.
    authority: HeaderValue,
    /// `/…/bot<token>/`: secret, never logged.
    path_prefix: String,
}

/// One open connection, with the future that drives it.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    driver: Pin<Box<Connection<Io, Full<Bytes>>>>,
    /// Whether a call has completed on it (a failure then may be a server's idle close).
    used: bool,
}

/// The poller's connection to the Bot API. Not shared: one per bot, used by one task.
pub struct Link {
    target: Target,
    scrub: Scrub,
    conn: Option<Conn>,
}

/// Turns an error into `Unavailable` without the token, which a path may quote. Kept
/// apart from the connection so the futures that borrow it stay `Send`.
struct Scrub {
    token: String,
}

impl Scrub {
    fn unavailable(&self, method: &str, e: impl std::fmt::Display) -> ApiError {
        let text = format!("{method}: {e}");
        let text = if self.token.is_empty() {
            text
        } else {
            text.replace(&self.token, "<token>")
        };
        ApiError::Unavailable(text)
    }
}

/// TLS settings shared by every bot of the plugin: the web PKI roots, parsed once.
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots =
                rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

impl Link {
    /// `prefix`: `{api_base}/bot{token}/`, already parsed.
    pub fn new(prefix: &reqwest::Url, token: &str) -> Result<Link, ApiError> {
        let bad = |why: &str| ApiError::Unavailable(format!("api_base is not usable: {why}"));
        let tls = match prefix.scheme() {
            "https" => true,
            "http" => false,
            _ => return Err(bad("only http:// and https:// are supported")),
        };
        let host = prefix.host_str().ok_or_else(|| bad("no host"))?;
        let port = prefix
            .port_or_known_default()
            .ok_or_else(|| bad("no port"))?;
        let authority = match prefix.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        let authority = HeaderValue::from_str(&authority).map_err(|_| bad("odd host"))?;
        // An IPv6 literal comes bracketed in the URL, not in a socket address.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Link {
            target: Target {
                tls,
                host,
                port,
                authority,
                path_prefix: prefix.path().to_owned(),
            },
            scrub: Scrub {
                token: token.to_owned(),
            },
            conn: None,
        })
    }

    /// Calls `method` with JSON `params`; the whole call is bounded by `timeout`.
    pub async fn call<T: DeserializeOwned>(
        &mut self,
        method: &str,
        params: &serde_json::Value,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        let body =
            Bytes::from(serde_json::to_vec(params).map_err(|e| self.scrub.unavailable(method, e))?);
        let (status, body) = match tokio::time::timeout(timeout, self.exchange(method, body)).await
        {
            Ok(r) => r?,
            Err(_) => {
                self.conn = None;
                return Err(self
                    .scrub
                    .unavailable(method, format!("no answer within {timeout:?}")));
            }
        };
        parse_answer(method, status, &String::from_utf8_lossy(&body))
    }

    /// One request and its whole answer, on the held connection or a new one.
    async fn exchange(&mut self, method: &str, body: Bytes) -> Result<(u16, Bytes), ApiError> {
        let reused = self.conn.as_ref().is_some_and(|c| c.used);
        match self.exchange_once(method, body.clone()).await {
            Err(_) if reused => {
                // The server may have closed it while it was idle: once more, fresh.
                self.exchange_once(method, body).await
            }
            r => r,
        }
    }

    async fn exchange_once(&mut self, method: &str, body: Bytes) -> Result<(u16, Bytes), ApiError> {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => connect(&self.target, &self.scrub, method).await?,
        };
        let req = self.request(method, body)?;
        let scrub = &self.scrub;
        let Conn {
            mut sender,
            mut driver,
            ..
        } = conn;
        let (result, driver) = {
            let answer = async {
                sender
                    .ready()
                    .await
                    .map_err(|e| scrub.unavailable(method, e))?;
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|e| scrub.unavailable(method, e))?;
                let status = resp.status().as_u16();
                let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                    .collect()
                    .await
                    .map_err(|e| scrub.unavailable(method, e))?
                    .to_bytes();
                Ok::<_, ApiError>((status, body))
            };
            // The connection is driven only while a call is in flight: between calls it
            // has nothing to do (a close by the server shows at the next call). Once it
            // ends (the server closed it, after answering or not, or it failed), it is
            // dropped, which settles the request: its answer, already handed over, or
            // an error.
            tokio::pin!(answer);
            tokio::select! {
                r = &mut answer => (r, Some(driver)),
                _ = driver.as_mut() => {
                    drop(driver);
                    (answer.await, None)
                }
            }
        };
        if let (Ok(_), Some(driver)) = (&result, driver) {
            self.conn = Some(Conn {
                sender,
                driver,
                used: true,
            });
        }
        result
    }

    fn request(&self, method: &str, body: Bytes) -> Result<Request<Full<Bytes>>, ApiError> {
        let t = &self.target;
        let len = body.len();
        Request::builder()
            .method(Method::POST)
            .uri(format!("{}{method}", t.path_prefix))
            .header(HOST, t.authority.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(CONTENT_LENGTH, len)
            .body(Full::new(body))
            .map_err(|e| self.scrub.unavailable(method, e))
    }
}

/// Opens a connection to the target (TCP, then TLS for https), within CONNECT_TIMEOUT.
async fn connect(t: &Target, scrub: &Scrub, method: &str) -> Result<Conn, ApiError> {
    let open = async {
        let tcp = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| scrub.unavailable(method, format!("cannot connect: {e}")))?;
        // Requests are written whole: do not hold their last segment back.
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Stream> = if t.tls {
            let name = rustls::pki_types::ServerName::try_from(t.host.clone())
                .map_err(|e| scrub.unavailable(method, e))?;
            let tls = tokio_rustls::TlsConnector::from(tls_config())
                .connect(name, tcp)
                .await
                .map_err(|e| scrub.unavailable(method, format!("TLS: {e}")))?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| scrub.unavailable(method, e))
    };
    let (sender, driver) = tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| scrub.unavailable(method, "cannot connect within 10 s"))??;
    Ok(Conn {
        sender,
        driver: Box::pin(driver),
        used: false,
    })
}
