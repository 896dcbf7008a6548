//! Errors of the domain: what a caller did wrong (`DomainError`) and how a job failed (`JobError`).
//!
//! `DomainError::kind()` is the stable `data.kind` string of the control socket's
//! application errors (SPEC §3), so the daemon can map errors without matching on text.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DomainError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    InvalidValue(String),
    #[error("{0}")]
    InsufficientFunds(String),
    #[error("{0}")]
    Conflict(String),
    /// The store or queue could not be reached; the caller may try again.
    #[error("{0}")]
    Unavailable(String),
}

impl DomainError {
    pub fn kind(&self) -> &'static str {
        match self {
            DomainError::NotFound(_) => "not_found",
            DomainError::Forbidden(_) => "forbidden",
            DomainError::InvalidValue(_) => "invalid_value",
            DomainError::InsufficientFunds(_) => "insufficient_funds",
            DomainError::Conflict(_) => "conflict",
            DomainError::Unavailable(_) => "unavailable",
        }
    }

    pub fn not_found(what: &str, id: impl std::fmt::Display) -> Self {
        DomainError::NotFound(format!("{what} {id} does not exist"))
    }
}

impl From<sqlx::Error> for DomainError {
    fn from(e: sqlx::Error) -> Self {
        DomainError::Unavailable(format!("store error: {e}"))
    }
}

/// How a job handler failed: decides between retrying with backoff and `dead` at once.
#[derive(Debug, Error)]
pub enum JobError {
    /// Running it again cannot help (malformed payload, unknown account, not built yet).
    #[error("{0}")]
    Permanent(String),
    /// A passing condition (store busy, SMTP down, connector unavailable).
    #[error("{0}")]
    Retryable(String),
}

impl From<DomainError> for JobError {
    fn from(e: DomainError) -> Self {
        match e {
            DomainError::Unavailable(m) => JobError::Retryable(m),
            other => JobError::Permanent(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        JobError::Retryable(format!("store error: {e}"))
    }
}
