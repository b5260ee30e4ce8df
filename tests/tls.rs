//! TLS on the client listener (rustls, `ring` provider), with certificates made here by rcgen: a `tls://` client
//! that trusts the CA works, the CLI too; a plain client or one that does not trust the CA does not get in.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use broker_client::proto::{TaskSpec, Value};
use broker_client::ConnectOptions;
use common::TestServer;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

/// A CA and a server certificate for `localhost` and 127.0.0.1, as PEM files: (ca, cert, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_clients_that_trust_the_ca_get_in_and_others_do_not() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(certs.path());
    let server = TestServer::start_with(
        |config| {
            config.tls_cert = Some(cert.clone());
            config.tls_key = Some(key.clone());
            config.hello_timeout_ms = 1000;
        },
        false,
    )
    .await;
    let port = server.handle.as_ref().unwrap().addr().port();

    let client = ConnectOptions::new(format!("tls://localhost:{port}")).tls_ca(&ca).connect().await.unwrap();
    let spec = TaskSpec { args: vec![Value::from("over tls")], ..TaskSpec::new("t") };
    let id = client.enqueue(spec).await.unwrap().id;
    assert_eq!(client.get(&id).await.unwrap().args, vec![Value::from("over tls")]);
    let by_ip = ConnectOptions::new(format!("tls://127.0.0.1:{port}")).tls_ca(&ca).connect().await.unwrap();
    by_ip.stats().await.unwrap();

    // Without the CA: the certificate is not trusted. Plain TCP to a TLS port: no hello reply.
    let untrusted = ConnectOptions::new(format!("tls://localhost:{port}")).connect().await.unwrap_err();
    assert!(untrusted.to_string().contains("TLS"), "{untrusted}");
    let plain = ConnectOptions::new(format!("127.0.0.1:{port}"))
        .connect_timeout(std::time::Duration::from_secs(3))
        .connect()
        .await;
    assert!(plain.is_err(), "a plain client was served on a TLS listener");

    // The CLI, with the CA from BROKER_TLS_CA.
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(["stat", "--json", "--addr", &format!("tls://localhost:{port}")])
            .env("BROKER_TLS_CA", &ca)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    client.stats().await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn a_certificate_without_its_key_is_refused_at_start() {
    let certs = tempfile::tempdir().unwrap();
    let (_, cert, _) = certificates(certs.path());
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(dir.path());
    config.tls_cert = Some(cert);
    let err = broker::server::start(config, std::sync::Arc::new(broker::clock::SystemClock)).await.err().unwrap();
    assert!(err.to_string().contains("tls_key"), "{err}");
}
