//! The one place where SDK errors become [`BrokerError`]s.

use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// How an SQS call failed, before it is given the broker's context.
#[derive(Debug)]
pub(crate) struct Fail {
    pub(crate) kind: Kind,
    /// The service's error code (`AWS.SimpleQueueService.NonExistentQueue`, ...), or empty.
    pub(crate) code: String,
    pub(crate) message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// No answer: connection refused, reset, DNS.
    Unreachable,
    /// No answer in time.
    Timeout,
    /// The service answered with an error.
    Service,
}

impl Fail {
    pub(crate) fn from_sdk<E>(e: SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let kind = match &e {
            SdkError::TimeoutError(_) => Kind::Timeout,
            SdkError::DispatchFailure(d) if d.is_timeout() => Kind::Timeout,
            SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => Kind::Unreachable,
            _ => Kind::Service,
        };
        let code = e.code().unwrap_or_default().to_owned();
        let message = match (kind, e.message()) {
            (Kind::Service, Some(m)) if !code.is_empty() => format!("{code}: {m}"),
            _ => DisplayErrorContext(&e).to_string(),
        };
        Self {
            kind,
            code,
            message,
        }
    }

    /// The queue is not there (deleted, or never created).
    pub(crate) fn missing_queue(&self) -> bool {
        missing_queue_code(&self.code)
    }

    /// The receipt handle no longer names a delivery (settled, or delivered again).
    pub(crate) fn stale_receipt(&self) -> bool {
        stale_code(&self.code, &self.message)
    }
}

pub(crate) fn missing_queue_code(code: &str) -> bool {
    code.contains("NonExistentQueue") || code.contains("QueueDoesNotExist")
}

/// Codes SQS (and its emulators) give for a receipt handle that no longer names a delivery.
pub(crate) fn stale_code(code: &str, message: &str) -> bool {
    code.contains("ReceiptHandleIsInvalid")
        || code.contains("MessageNotInflight")
        || (code.contains("InvalidParameterValue")
            && (message.contains("receipt handle") || message.contains("ReceiptHandle")))
}
