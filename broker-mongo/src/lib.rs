//! MongoDB broker (in progress).
