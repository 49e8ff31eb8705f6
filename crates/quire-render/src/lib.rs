//! quire-render
