//! Amazon SQS broker (in progress).
