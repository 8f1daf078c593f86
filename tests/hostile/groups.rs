//! The job runs with its user's supplementary groups (initgroups), not root's and not none.

use std::process::Command;

use serde_json::json;

use crate::common::{not_root, open_harness};
use crate::support::chmod;

const GROUP: &str = "c3hostile_g";
const USER: &str = "c3hostile_u";

/// Creates the test group and user unless they exist (another run may have made them).
fn ensure_user() -> u32 {
    let out = Command::new("groupadd")
        .args(["-f", GROUP])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "groupadd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if nix::unistd::User::from_name(USER).unwrap().is_none() {
        let out = Command::new("useradd")
            .args([
                "-M",
                "-N",
                "-g",
                "nogroup",
                "-G",
                GROUP,
                "-s",
                "/usr/sbin/nologin",
                USER,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("already exists"),
            "useradd: {err}"
        );
    }
    nix::unistd::Group::from_name(GROUP)
        .unwrap()
        .expect("the test group exists")
        .gid
        .as_raw()
}

#[test]
fn the_job_has_its_users_supplementary_groups() {
    if not_root() {
        return;
    }
    let gid = ensure_user();
    let h = open_harness();
    let gfile = h.path("gfile");
    std::fs::write(&gfile, "for the group\n").unwrap();
    nix::unistd::chown(
        &gfile,
        Some(nix::unistd::Uid::from_raw(0)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .unwrap();
    chmod(&gfile, 0o640);

    let script = format!(
        "id -G > $C3_ARTIFACTS_DIR/groups; cat '{}' > $C3_ARTIFACTS_DIR/gcopy",
        gfile.display()
    );
    let run = h.run_job(json!({"job_id": "grp", "user": USER, "command": ["sh", "-c", script]}));
    run.assert_code(0);
    let art = h.workdir("grp").join("artifacts");
    let groups = std::fs::read_to_string(art.join("groups")).unwrap();
    assert!(
        groups.split_whitespace().any(|g| g == gid.to_string()),
        "the job's groups {groups:?} lack {GROUP} ({gid})"
    );
    assert!(
        !groups.split_whitespace().any(|g| g == "0"),
        "the job kept root's group: {groups:?}"
    );
    assert_eq!(
        std::fs::read_to_string(art.join("gcopy")).unwrap(),
        "for the group\n"
    );
}
