//! A re-formed image group's task: unchanged members take over their earlier records, only the
//! new or changed images go to the model.

use crate::stage::process::process_images;
use crate::stage::process::ProcessContext;
use crate::error::TaskFailure;
use quire_core::{results_key, Record, TaskSpec};
use quire_store::BlobStore;
use crate::source::Fetch;

/// Processes a group of loose images, taking over the records of members that an earlier
/// group of the same job made and that are unchanged since ([`TaskSpec::reuse`]): only the
/// other members are fetched and given to the model. A taken-over record keeps the `task_id`
/// of the task that made it (so a run's counts, device time and cost are its own work only);
/// the results file it now sits in names this task. A member whose earlier records cannot be
/// read (moved, pruned, unreadable) is made again.
pub async fn process_images_reusing(store: &dyn BlobStore, task: &TaskSpec, fetch: &dyn Fetch, ctx: &ProcessContext) -> Result<Vec<Record>, TaskFailure> {
    let members: std::collections::HashSet<&str> = task.members.iter().map(|m| m.uri.as_str()).collect();
    let is_id = |id: &str| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let mut earlier: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
    for (uri, id) in &task.reuse {
        if members.contains(uri.as_str()) && is_id(id) {
            earlier.insert(id.as_str());
        }
    }
    let mut taken: std::collections::HashMap<String, Vec<Record>> = std::collections::HashMap::new();
    for id in earlier {
        let key = results_key(&task.settings.job, id);
        let Ok(Some(bytes)) = store.get(&key).await else { continue };
        let Ok(records) = crate::sink::jsonl::parse_jsonl(&bytes) else { continue };
        for r in records {
            if task.reuse.get(&r.source).is_some_and(|want| want == id) && !r.failed() {
                taken.entry(r.source.clone()).or_default().push(r);
            }
        }
    }
    if taken.is_empty() {
        return process_images(task, fetch, ctx).await;
    }
    let rest = TaskSpec { members: task.members.iter().filter(|m| !taken.contains_key(&m.uri)).cloned().collect(), ..task.clone() };
    let mut made: std::collections::HashMap<String, Vec<Record>> = std::collections::HashMap::new();
    if !rest.members.is_empty() {
        for r in process_images(&rest, fetch, ctx).await? {
            made.entry(r.source.clone()).or_default().push(r);
        }
    }
    tracing::info!(task = %task.task_id, reused = taken.len(), made = rest.members.len(), "image group re-formed: records of unchanged images taken over");
    let mut out = Vec::new();
    for m in &task.members {
        if let Some(rs) = taken.remove(&m.uri).or_else(|| made.remove(&m.uri)) {
            out.extend(rs);
        }
    }
    Ok(out)
}
