//! quire-pipeline
