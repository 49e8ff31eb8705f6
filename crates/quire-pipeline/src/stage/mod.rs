//! What is done to a task's units, in order: [`plan`] (an object and its probe become tasks
//! with stable ids), [`split`] (a whole-document task opened and split by a worker),
//! [`process`] (one task to its records: render or decode, [`route`] to the text layer or the
//! model, [`doctags`] to Markdown and blocks), [`reuse`] (a re-formed image group takes over
//! its unchanged members' records), [`infer`] (one model per process behind a channel,
//! batching across tasks) and [`vlm`] (the `quire-vlm` models behind [`infer::Generator`]).
//! May import `source` and `error`; never `worker`, `sink` or `coordinator`.

pub mod doctags;
pub mod infer;
pub mod plan;
pub mod process;
pub mod reuse;
pub mod route;
pub mod split;
pub mod vlm;
