//! The job's structured result (contract §4): a small JSON value it may leave in
//! `$C3_RESULT_FILE`, read without following any symlink and only if the job's user could.

use std::path::Path;

use crate::confine::JobReader;

/// Largest structured result a job may hand back (contract §4).
pub const MAX_RESULT_BYTES: u64 = 64 * 1024;

/// Deepest nesting a result may have. serde_json reads at most 128 levels, and the result is
/// carried a level or two down inside the manifest and the terminal status: a result 127
/// deep would make its job's manifest unreadable, and every later gc refuses to delete
/// anything while one manifest cannot be read.
pub const MAX_RESULT_DEPTH: usize = 64;

/// `<workdir>/.c3/result.json`.
pub fn result_path(workdir: &Path) -> std::path::PathBuf {
    workdir.join(".c3").join("result.json")
}

/// The result, `Null` when there is none; `Err` says why a file that is there was ignored.
pub fn read(workdir: &Path, reader: Option<&JobReader>) -> Result<serde_json::Value, String> {
    use std::io::Read;
    crate::fault::blocking_pause("result-read-hangs", std::time::Duration::from_secs(3600));
    let path = result_path(workdir);
    // Through `.c3/` as the job's user would go: the job may have made it a directory of
    // someone else's that it cannot enter.
    let opened = match reader {
        Some(reader) => crate::confine::open_read_as(workdir, Path::new(".c3/result.json"), reader)
            .map(|f| f.ok_or("its directory is not readable by the job's user")),
        None => crate::confine::open_read(Some(workdir), &path).map(Ok),
    };
    let mut file = match opened {
        Ok(Ok(f)) => f,
        Ok(Err(why)) => return Err(why.into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(serde_json::Value::Null),
        Err(e) => return Err(format!("cannot open it: {e}")),
    };
    let st = crate::confine::fstat(&file).map_err(|e| e.to_string())?;
    if !crate::confine::is_regular(&st) {
        return Err("not a regular file".into());
    }
    if let Some(reader) = reader {
        match reader.may_read(&file, &st) {
            Ok(true) => {}
            Ok(false) => return Err("not readable by the job's user".into()),
            Err(e) => return Err(format!("cannot read its ACL: {e}")),
        }
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
    let value = c3_proto::parse_json_value(&bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    if depth(&value) > MAX_RESULT_DEPTH {
        return Err(format!(
            "nested over the limit of {MAX_RESULT_DEPTH} levels"
        ));
    }
    // PostgreSQL's jsonb and text refuse U+0000: a control plane on it answered the terminal
    // status with a 500 (or a 4xx), for good. Refused here with a warning the job can read,
    // and kept out of the manifest alike, rather than dropped there with the status's warnings.
    if holds_nul(&value) {
        return Err(
            "it holds a NUL character (U+0000), which a control plane's database may refuse".into(),
        );
    }
    Ok(value)
}

/// Whether a string or key in `value` holds U+0000, without recursion.
fn holds_nul(value: &serde_json::Value) -> bool {
    let mut stack = vec![value];
    while let Some(v) = stack.pop() {
        match v {
            serde_json::Value::String(s) if s.contains('\0') => return true,
            serde_json::Value::Array(a) => stack.extend(a),
            serde_json::Value::Object(o) => {
                if o.keys().any(|k| k.contains('\0')) {
                    return true;
                }
                stack.extend(o.values());
            }
            _ => {}
        }
    }
    false
}

/// How many arrays and objects deep `value` goes (a scalar is 0), without recursion.
fn depth(value: &serde_json::Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0)];
    while let Some((v, d)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match v {
            serde_json::Value::Array(a) => Box::new(a.iter()),
            serde_json::Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        deepest = deepest.max(d + 1);
        stack.extend(children.map(|c| (c, d + 1)));
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        "[".repeat(levels) + &"]".repeat(levels)
    }

    /// A job's floats reach the manifest and the status as the numbers it wrote: serde_json's
    /// fast parser was a unit in the last place off for some (the manifest said another
    /// number than the job's result file).
    #[test]
    fn a_results_floats_are_the_numbers_written() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".c3")).unwrap();
        std::fs::write(
            result_path(dir.path()),
            r#"{"x":2.2250738585072011e-308,"loss":0.30000000000000004,"max":1.7976931348623157e308}"#,
        )
        .unwrap();
        let v = read(dir.path(), None).unwrap();
        assert_eq!(
            v.to_string(),
            r#"{"loss":0.30000000000000004,"max":1.7976931348623157e+308,"x":2.225073858507201e-308}"#
        );
    }

    #[test]
    fn depth_counts_arrays_and_objects() {
        let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert_eq!(depth(&v("1")), 0);
        assert_eq!(depth(&v(r#"{"a":[1,{"b":2}],"c":3}"#)), 3);
        assert_eq!(depth(&v(&nested(100))), 100);
    }

    /// A NUL (valid JSON, `\u0000`) made the terminal status one PostgreSQL refuses: the
    /// control plane answered it with a 500 or a 4xx, and the job stayed FINALIZING there.
    #[test]
    fn a_result_holding_a_nul_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".c3")).unwrap();
        let write = |s: &str| std::fs::write(result_path(dir.path()), s).unwrap();
        for nul in [
            r#"{"x":"\u0000"}"#,
            r#"{"a":[{"\u0000k":1}]}"#,
            r#""a\u0000""#,
        ] {
            write(nul);
            let err = read(dir.path(), None).unwrap_err();
            assert!(err.contains("NUL"), "{nul}: {err}");
        }
        write(r#"{"x":"\u0001 \\u0000"}"#);
        assert!(read(dir.path(), None).is_ok(), "no NUL, only its spelling");
    }

    #[test]
    fn a_result_nested_too_deep_is_refused_and_one_at_the_limit_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".c3")).unwrap();
        let write = |s: String| std::fs::write(result_path(dir.path()), s).unwrap();
        write(nested(127));
        let err = read(dir.path(), None).unwrap_err();
        assert!(err.contains("nested"), "{err}");
        write(format!("{{\"a\":{}}}", nested(MAX_RESULT_DEPTH - 1)));
        assert_eq!(depth(&read(dir.path(), None).unwrap()), MAX_RESULT_DEPTH);
    }
}
