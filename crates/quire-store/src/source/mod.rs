//! Sources of work: listing input objects ([`inputs`]) and walking archive inputs member by
//! member ([`archive`]). The crate root re-exports both as `quire_store::inputs` and
//! `quire_store::archive`. Imports: nothing of this crate (the S3 listing lives in `s3::source`
//! and imports [`inputs`], never the other way round).

pub mod archive;
pub mod inputs;
