//! Page refcount layer (see issue 5).
