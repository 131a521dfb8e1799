//! Server-sent events: parser, framer and encoder (work in progress).
