//! The job's structured result (contract §4): a small JSON value it may leave in
//! `$C3_RESULT_FILE`, read without following any symlink and only if the job's user could.

use std::path::Path;

use crate::confine::JobReader;

/// Largest structured result a job may hand back (contract §4).
pub const MAX_RESULT_BYTES: u64 = 64 * 1024;

/// `<workdir>/.c3/result.json`.
pub fn result_path(workdir: &Path) -> std::path::PathBuf {
    workdir.join(".c3").join("result.json")
}

/// The result, `Null` when there is none; `Err` says why a file that is there was ignored.
pub fn read(workdir: &Path, reader: Option<&JobReader>) -> Result<serde_json::Value, String> {
    use std::io::Read;
    let path = result_path(workdir);
    let mut file = match crate::confine::open_read(Some(workdir), &path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(serde_json::Value::Null),
        Err(e) => return Err(format!("cannot open it: {e}")),
    };
    let st = crate::confine::fstat(&file).map_err(|e| e.to_string())?;
    if !crate::confine::is_regular(&st) {
        return Err("not a regular file".into());
    }
    if reader.is_some_and(|r| !r.can_read(&st)) {
        return Err("not readable by the job's user".into());
    }
    if st.st_size as u64 > MAX_RESULT_BYTES {
        return Err(format!(
            "{} bytes is over the limit of {MAX_RESULT_BYTES}",
            st.st_size
        ));
    }
    let mut bytes = Vec::new();
    file.by_ref()
        .take(MAX_RESULT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_RESULT_BYTES {
        return Err(format!("over the limit of {MAX_RESULT_BYTES} bytes"));
    }
    c3_proto::parse_json_value(&bytes).map_err(|e| format!("not valid JSON: {e}"))
}
