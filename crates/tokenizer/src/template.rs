//! Chat templates (placeholder: being implemented).
