//! Who may act on the dashboard: the holder of `http.token`.
//!
//! A browser signs in once by posting the token; it gets a random session id in a
//! cookie (`HttpOnly`, `SameSite=Strict`) that this process remembers (a restart signs
//! everyone out). Every action is a POST that carries, besides the cookie, a CSRF token
//! derived from the session (HMAC-SHA256 keyed by `http.token`) in a form field, and,
//! when the browser sends one, an `Origin` of this very host: another site can neither
//! read the field nor forge it. Scripts skip the cookie and send
//! `Authorization: Bearer <token>`, which no browser adds on its own.
//!
//! Without `http.token` the dashboard is read-only. On a listener that is not a
//! loopback address (`public`) every page needs the session or the bearer token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

pub const COOKIE: &str = "patchbay_session";
/// Signed-in browsers remembered at once; the oldest is forgotten first.
const MAX_SESSIONS: usize = 256;
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

pub struct Auth {
    token: Option<String>,
    public: bool,
    sessions: Mutex<HashMap<String, Instant>>,
}

/// Why an action was refused, for the reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `http.token` is configured: the dashboard is read-only.
    ReadOnly,
    /// Neither a valid session nor the bearer token.
    NotSignedIn,
    /// A session, but not the CSRF token of it, or a foreign `Origin`.
    Forged,
}

impl Auth {
    pub fn new(token: Option<String>, public: bool) -> Auth {
        Auth {
            token,
            public,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Whether actions are possible at all.
    pub fn enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Whether every page needs the token (a non-loopback listener).
    pub fn public(&self) -> bool {
        self.public
    }

    fn mac(&self, data: &[u8]) -> Option<HmacSha256> {
        let token = self.token.as_ref()?;
        let mut mac = HmacSha256::new_from_slice(token.as_bytes()).ok()?;
        mac.update(data);
        Some(mac)
    }

    /// Compares `given` with the token in constant time (as MACs of both).
    fn is_token(&self, given: &str) -> bool {
        let (Some(token), Some(mac)) = (&self.token, self.mac(given.as_bytes())) else {
            return false;
        };
        self.mac(token.as_bytes())
            .is_some_and(|expected| mac.verify_slice(&expected.finalize().into_bytes()).is_ok())
    }

    /// `Authorization: Bearer <token>`.
    pub fn bearer(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| self.is_token(t.trim()))
    }

    /// Signs a browser in: a new session id if `given` is the token.
    pub fn login(&self, given: &str) -> Option<String> {
        if !self.is_token(given) {
            return None;
        }
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).ok()?;
        let id = hex::encode(bytes);
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        sessions.retain(|_, at| now.duration_since(*at) < SESSION_TTL);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(id.clone(), now);
        Some(id)
    }

    pub fn logout(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers) {
            self.sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
    }

    /// The request's live session id, if it has one.
    pub fn session(&self, headers: &HeaderMap) -> Option<String> {
        let id = cookie(headers)?;
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let at = sessions.get(&id)?;
        (at.elapsed() < SESSION_TTL).then_some(id)
    }

    /// Whether the request may see pages: always on loopback, else signed in.
    pub fn may_read(&self, headers: &HeaderMap) -> bool {
        !self.public || self.bearer(headers) || self.session(headers).is_some()
    }

    /// The CSRF token of a session, for its forms.
    pub fn csrf(&self, session: &str) -> Option<String> {
        let mac = self.mac(format!("csrf:{session}").as_bytes())?;
        Some(hex::encode(mac.finalize().into_bytes()))
    }

    /// Whether the request may act: the bearer token, or a session with its CSRF
    /// token and no foreign `Origin`.
    pub fn may_act(&self, headers: &HeaderMap, csrf: Option<&str>) -> Result<(), Refusal> {
        if !self.enabled() {
            return Err(Refusal::ReadOnly);
        }
        if self.bearer(headers) {
            return Ok(());
        }
        let session = self.session(headers).ok_or(Refusal::NotSignedIn)?;
        if !same_origin(headers) {
            return Err(Refusal::Forged);
        }
        let (Some(given), Some(mac)) = (
            csrf.and_then(|c| hex::decode(c).ok()),
            self.mac(format!("csrf:{session}").as_bytes()),
        ) else {
            return Err(Refusal::Forged);
        };
        mac.verify_slice(&given).map_err(|_| Refusal::Forged)
    }
}

/// The session cookie's value.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// No `Origin` (not a browser's cross-site request), or one naming the `Host` asked.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    host.is_some_and(|h| origin == format!("http://{h}") || origin == format!("https://{h}"))
}

/// `Set-Cookie` for a new session.
pub fn session_cookie(id: &str) -> String {
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    )
}

/// `Set-Cookie` that ends the session.
pub fn cleared_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

pub fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "this listener needs http.token: send Authorization: Bearer <token>\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    const TOKEN: &str = "0123456789abcdef-token";

    fn with(pairs: &[(header::HeaderName, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn actions_need_the_session_and_its_csrf_token() {
        let auth = Auth::new(Some(TOKEN.into()), false);
        assert!(auth.login("wrong").is_none());
        let id = auth.login(TOKEN).expect("signed in");
        let csrf = auth.csrf(&id).unwrap();
        let signed_in = with(&[(header::COOKIE, format!("a=b; {COOKIE}={id}"))]);
        assert_eq!(auth.may_act(&signed_in, Some(&csrf)), Ok(()));
        assert_eq!(auth.may_act(&signed_in, None), Err(Refusal::Forged));
        let other = auth.csrf("another-session").unwrap();
        assert_eq!(auth.may_act(&signed_in, Some(&other)), Err(Refusal::Forged));
        assert_eq!(
            auth.may_act(&HeaderMap::new(), Some(&csrf)),
            Err(Refusal::NotSignedIn)
        );
        let foreign = with(&[
            (header::COOKIE, format!("{COOKIE}={id}")),
            (header::HOST, "127.0.0.1:9464".into()),
            (header::ORIGIN, "http://evil.example".into()),
        ]);
        assert_eq!(auth.may_act(&foreign, Some(&csrf)), Err(Refusal::Forged));
        auth.logout(&signed_in);
        assert_eq!(
            auth.may_act(&signed_in, Some(&csrf)),
            Err(Refusal::NotSignedIn)
        );
    }

    #[test]
    fn a_bearer_token_acts_and_no_token_means_read_only() {
        let auth = Auth::new(Some(TOKEN.into()), true);
        let bearer = with(&[(header::AUTHORIZATION, format!("Bearer {TOKEN}"))]);
        assert_eq!(auth.may_act(&bearer, None), Ok(()));
        assert!(auth.may_read(&bearer));
        assert!(
            !auth.may_read(&HeaderMap::new()),
            "public: reads need it too"
        );
        let wrong = with(&[(header::AUTHORIZATION, "Bearer nope".into())]);
        assert!(!auth.may_read(&wrong));
        let none = Auth::new(None, false);
        assert_eq!(none.may_act(&bearer, None), Err(Refusal::ReadOnly));
        assert!(none.may_read(&HeaderMap::new()));
    }
}
