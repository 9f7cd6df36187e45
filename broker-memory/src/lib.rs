//! An in-process broker (work in progress).
#![warn(missing_docs)]
