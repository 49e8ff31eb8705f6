//! quire-vlm
