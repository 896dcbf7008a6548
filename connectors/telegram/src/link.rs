//! A bot's own HTTP/1 connection to the Bot API for its poller's calls (getMe, then
//! getUpdates after getUpdates): opened at the first call, kept alive and reused for
//! every next one, driven inside the poller's task (hyper's `client::conn` over a
//! socket from hyper-util's `HttpConnector`, with rustls for https).
//!
//! Why not the shared pooled client (`api::Api`, which `send` keeps using): an idle
//! Telegram channel is a long poll answered every 25 s, so 10,000 channels make ~400
//! round trips a second that carry nothing. Through the pool each one paid a checkout,
//! a request builder, response decoders and a hand-off to and from the connection's own
//! task; here it is one request written on a connection the poller already holds, and
//! the answer read in the same task. A long poll holds a connection for its whole
//! duration anyway, so a pool shares nothing between polls.
//!
//! What the pooled client does and this keeps: `HttpConnector` tries every address of
//! the host with IPv6/IPv4 fallback (happy eyeballs), the whole connect (DNS, TCP, TLS)
//! is bounded by 10 s, TCP keepalive probes as reqwest's do (15 s, every 15 s, 3), and
//! TLS offers `http/1.1` by ALPN. Left to the pooled client, which the link then uses
//! for its calls: a proxy (when the environment's `HTTP_PROXY`, `HTTPS_PROXY`,
//! `ALL_PROXY` and `NO_PROXY`, read once the way reqwest reads them, send the Bot API
//! through one) and an `api_base` with a user name or password (basic auth). Redirects
//! are not followed: a poll redirected to a GET would lose its offset, so a 3xx is an
//! error naming where it points.
//!
//! Reuse rules: a connection whose call fails or times out is dropped (its state is
//! unknown), and one idle longer than `MAX_IDLE` (after a backoff or a `retry_after`)
//! is not reused: servers close idle connections, often without a word. A call that
//! fails on a reused connection before any answer arrived (the server closed it while
//! idle) is tried once more on a fresh one, with a timeout of its own (so a call may
//! take twice its timeout); that is safe for the calls made here (getMe, and getUpdates,
//! which only confirms what its offset says), and why the link is not for sends.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue, LOCATION};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use patchbay_connector_sdk::runtime::tokio;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tower_service::Service;

use crate::api::{Api, ApiError, MAX_RESPONSE_BYTES, parse_answer, scrub};

/// The whole connect (DNS, TCP, TLS), as the pooled client's connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection idle longer than this is closed rather than reused.
pub(crate) const MAX_IDLE: Duration = Duration::from_secs(30);
/// TCP keepalive as reqwest sets it: first probe after 15 s idle, then every 15 s,
/// 3 unanswered probes and the socket fails.
const TCP_KEEPALIVE: Duration = Duration::from_secs(15);
const TCP_KEEPALIVE_RETRIES: u32 = 3;

/// A plain or TLS stream.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}
type Io = TokioIo<Box<dyn Stream>>;

/// The poller's way to the Bot API. Not shared: one per bot, used by one task.
pub struct Link {
    route: Route,
}

enum Route {
    /// Through a proxy: the pooled client, which knows how.
    Pooled(Api),
    Direct(Direct),
}

/// The bot's own connection, opened at need.
struct Direct {
    target: Target,
    scrub: Scrub,
    conn: Option<Conn>,
}

/// Where the bot's calls go: parsed once from the API prefix.
struct Target {
    tls: bool,
    /// `scheme://host:port/`, what the connector dials.
    origin: Uri,
    /// The host as TLS names it (an IPv6 literal without its brackets).
    host: String,
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
    /// When its last call ended.
    idle_since: Instant,
}

/// An answer's status, and where a redirect points.
struct Status {
    code: u16,
    redirect: Option<String>,
}

/// A failed attempt, and whether a fresh connection may try again.
struct Failure {
    error: ApiError,
    /// The connection closed before any answer came: the server may have closed it
    /// while it was idle.
    closed_early: bool,
}

/// Turns an error into `Unavailable` without the token, which a path may quote. Kept
/// apart from the connection so the futures that borrow it stay `Send`.
struct Scrub {
    token: String,
}

impl Scrub {
    fn unavailable(&self, method: &str, e: impl std::fmt::Display) -> ApiError {
        ApiError::Unavailable(scrub(format!("{method}: {e}"), &self.token))
    }

    fn fail(&self, method: &str, e: impl std::fmt::Display, closed_early: bool) -> Failure {
        Failure {
            error: self.unavailable(method, e),
            closed_early,
        }
    }
}

/// TLS settings shared by every bot of the plugin: the web PKI roots, parsed once. An
/// error (the provider refusing the default protocol versions) fails the connect, not
/// the plugin.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    if let Some(c) = CONFIG.get() {
        return Ok(c.clone());
    }
    let roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(CONFIG.get_or_init(|| Arc::new(config)).clone())
}

/// The socket connector shared by every bot of the plugin (its clones share settings).
fn connector() -> HttpConnector {
    static CONNECTOR: OnceLock<HttpConnector> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let mut c = HttpConnector::new();
            // TLS is layered on here, so https origins are dialled as plain TCP.
            c.enforce_http(false);
            c.set_connect_timeout(Some(CONNECT_TIMEOUT));
            c.set_keepalive(Some(TCP_KEEPALIVE));
            c.set_keepalive_interval(Some(TCP_KEEPALIVE));
            c.set_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES));
            // Requests are written whole: do not hold their last segment back.
            c.set_nodelay(true);
            c
        })
        .clone()
}

/// The environment's proxy settings, read once, the way the pooled client reads them.
fn system_proxies() -> &'static Matcher {
    static PROXIES: OnceLock<Matcher> = OnceLock::new();
    PROXIES.get_or_init(Matcher::from_system)
}

/// Whether `proxies` send requests for `origin` through a proxy.
pub(crate) fn proxied(proxies: &Matcher, origin: &Uri) -> bool {
    proxies.intercept(origin).is_some()
}

impl Link {
    /// The link for `api`'s bot: direct unless the environment names a proxy for it or
    /// its `api_base` carries credentials (see the module doc).
    pub fn new(api: &Api) -> Result<Link, ApiError> {
        Link::with_proxies(api, system_proxies())
    }

    pub(crate) fn with_proxies(api: &Api, proxies: &Matcher) -> Result<Link, ApiError> {
        let target = Target::parse(api.prefix())?;
        let prefix = api.prefix();
        let credentials = !prefix.username().is_empty() || prefix.password().is_some();
        let route = if credentials || proxied(proxies, &target.origin) {
            Route::Pooled(api.clone())
        } else {
            Route::Direct(Direct {
                target,
                scrub: Scrub {
                    token: api.token().to_owned(),
                },
                conn: None,
            })
        };
        Ok(Link { route })
    }

    /// Whether calls go over the bot's own connection (not the pooled client).
    pub fn is_direct(&self) -> bool {
        matches!(self.route, Route::Direct(_))
    }

    /// Before a wait of `d`: a connection that would sit idle past `MAX_IDLE` is closed
    /// now rather than held (half-closed by the server, perhaps) until the next call.
    pub fn resting(&mut self, d: Duration) {
        if let Route::Direct(direct) = &mut self.route
            && d >= MAX_IDLE
        {
            direct.conn = None;
        }
    }

    /// Calls `method` with JSON `params`; each attempt is bounded by `timeout`. Only
    /// for calls that are safe to repeat: one may reach the server twice.
    pub async fn call<T: DeserializeOwned>(
        &mut self,
        method: &str,
        params: &serde_json::Value,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        match &mut self.route {
            Route::Pooled(api) => api.call(method, params, timeout).await,
            Route::Direct(d) => d.call(method, params, timeout).await,
        }
    }
}

impl Target {
    /// `prefix`: `{api_base}/bot{token}/`, already parsed.
    fn parse(prefix: &reqwest::Url) -> Result<Target, ApiError> {
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
        let origin: Uri = format!("{}://{host}:{port}/", prefix.scheme())
            .parse()
            .map_err(|_| bad("odd host"))?;
        let authority = HeaderValue::from_str(&authority).map_err(|_| bad("odd host"))?;
        // An IPv6 literal comes bracketed in the URL, not in a TLS server name.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Target {
            tls,
            origin,
            host,
            authority,
            path_prefix: prefix.path().to_owned(),
        })
    }
}

impl Direct {
    async fn call<T: DeserializeOwned>(
        &mut self,
        method: &str,
        params: &serde_json::Value,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        let body =
            Bytes::from(serde_json::to_vec(params).map_err(|e| self.scrub.unavailable(method, e))?);
        if self
            .conn
            .as_ref()
            .is_some_and(|c| c.idle_since.elapsed() > MAX_IDLE)
        {
            self.conn = None;
        }
        let reused = self.conn.as_ref().is_some_and(|c| c.used);
        let (status, body) = match self.attempt(method, body.clone(), timeout).await {
            Err(f) if reused && f.closed_early => self.attempt(method, body, timeout).await,
            r => r,
        }
        .map_err(|f| f.error)?;
        if let Some(location) = status.redirect {
            return Err(self.scrub.unavailable(
                method,
                format!(
                    "the Bot API answered HTTP {} redirecting to {location}; set api_base to \
                     the address it redirects to",
                    status.code
                ),
            ));
        }
        parse_answer(method, status.code, &String::from_utf8_lossy(&body))
            .map_err(|e| e.scrubbed(&self.scrub.token))
    }

    /// One try, on the held connection or a new one, bounded by `timeout`.
    async fn attempt(
        &mut self,
        method: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<(Status, Bytes), Failure> {
        match tokio::time::timeout(timeout, self.exchange(method, body)).await {
            Ok(r) => r,
            Err(_) => {
                // Whatever the connection was doing, it is not reused.
                self.conn = None;
                Err(self
                    .scrub
                    .fail(method, format!("no answer within {timeout:?}"), false))
            }
        }
    }

    /// One request and its whole answer. The connection is kept only when both went
    /// through and it is still open.
    async fn exchange(&mut self, method: &str, body: Bytes) -> Result<(Status, Bytes), Failure> {
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
                // Until the head arrives, a failure means the connection closed first.
                sender
                    .ready()
                    .await
                    .map_err(|e| scrub.fail(method, causes(&e), true))?;
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|e| scrub.fail(method, causes(&e), closed_early(&e)))?;
                let status = Status {
                    code: resp.status().as_u16(),
                    redirect: resp
                        .status()
                        .is_redirection()
                        .then(|| resp.headers().get(LOCATION))
                        .map(|l| {
                            l.and_then(|l| l.to_str().ok())
                                .unwrap_or("(no location)")
                                .to_owned()
                        }),
                };
                let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                    .collect()
                    .await
                    .map_err(|e| scrub.fail(method, causes(&*e), false))?
                    .to_bytes();
                Ok::<_, Failure>((status, body))
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
                idle_since: Instant::now(),
            });
        }
        result
    }

    fn request(&self, method: &str, body: Bytes) -> Result<Request<Full<Bytes>>, Failure> {
        let t = &self.target;
        let len = body.len();
        Request::builder()
            .method(Method::POST)
            .uri(format!("{}{method}", t.path_prefix))
            .header(HOST, t.authority.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(CONTENT_LENGTH, len)
            .body(Full::new(body))
            .map_err(|e| self.scrub.fail(method, e, false))
    }
}

/// Whether a request's error says the connection went away before any answer: it was
/// closed, reset or canceled with the request unanswered (`send_request` fails only
/// before the answer's head). A TLS peer that closes without close_notify shows as an
/// unexpected EOF. A timeout or an unreadable answer is not such an error.
fn closed_early(e: &hyper::Error) -> bool {
    e.is_canceled() || e.is_closed() || e.is_incomplete_message() || io_reset(e)
}

/// An error with its causes: hyper's and the connector's own texts are only a summary
/// ("connection error", "tcp connect error").
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn io_reset(e: &hyper::Error) -> bool {
    use std::error::Error as _;
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof
            );
        }
        source = s.source();
    }
    false
}

/// Opens a connection to the target: TCP by `HttpConnector`, then TLS for https, all
/// within CONNECT_TIMEOUT.
async fn connect(t: &Target, scrub: &Scrub, method: &str) -> Result<Conn, Failure> {
    let cannot = |e: String| scrub.fail(method, format!("cannot connect: {e}"), false);
    let open = async {
        let tcp = connector()
            .call(t.origin.clone())
            .await
            .map_err(|e| cannot(causes(&e)))?
            .into_inner();
        let stream: Box<dyn Stream> = if t.tls {
            let name = rustls::pki_types::ServerName::try_from(t.host.clone())
                .map_err(|e| cannot(e.to_string()))?;
            let config = tls_config().map_err(|e| cannot(format!("TLS setup: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| cannot(format!("TLS: {e}")))?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| cannot(causes(&e)))
    };
    let (sender, driver) = tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .map_err(|_| cannot(format!("no connection within {CONNECT_TIMEOUT:?}")))??;
    Ok(Conn {
        sender,
        driver: Box::pin(driver),
        used: false,
        idle_since: Instant::now(),
    })
}
