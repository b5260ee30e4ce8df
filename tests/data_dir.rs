//! The data directory holds every task's arguments and context: other local users must not read it.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use broker_client::proto::{TaskSpec, Value};
use common::{Daemon, TestServer};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o777
}

/// Every file and directory under `root`, with its mode.
fn walk(root: &Path, out: &mut Vec<(std::path::PathBuf, u32)>) {
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        out.push((path.clone(), mode(&path)));
        if path.is_dir() {
            walk(&path, out);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_makes_its_data_dir_and_files_private() {
    let base = tempfile::tempdir().unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = base.path().join("data");
    let daemon = Daemon::spawn(&data);
    let client = daemon.client().await;
    let spec = TaskSpec { args: vec![Value::from("secret")], ..TaskSpec::new("t") };
    client.enqueue(spec).await.unwrap();
    drop(client);
    assert_eq!(mode(&data), 0o700);
    let mut files = Vec::new();
    walk(&data, &mut files);
    assert!(files.len() >= 2, "{files:?}");
    for (path, mode) in files {
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
    }
    daemon.kill_9();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_data_dir_open_to_others_is_narrowed_to_its_owner() {
    let base = tempfile::tempdir().unwrap();
    let data = base.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = TestServer::start_with(|config| config.data_dir = data.clone(), false).await;
    assert_eq!(mode(&data), 0o700);
    server.stop().await;
}
