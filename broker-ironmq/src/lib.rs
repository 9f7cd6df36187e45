//! IronMQ v3 broker over HTTP: reservations, touch, release, batched deletes (in progress).
