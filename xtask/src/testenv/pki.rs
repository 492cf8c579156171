//! The test environment's credentials: a CA and serving certificate (rcgen),
//! the service-account key pair, a static admin token and the kubeconfig that
//! uses them.

use std::{
    fs::{self, File},
    io::Read as _,
    path::Path,
};

use anyhow::Context as _;

pub(super) fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0_u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// CA, serving certificate for 127.0.0.1/localhost (and the in-cluster
/// names), service-account key pair: ECDSA P-256, PEM, made in-process.
pub(super) fn generate_pki(pki: &Path) -> anyhow::Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    fs::create_dir_all(pki).with_context(|| format!("mkdir {}", pki.display()))?;
    let ten_years = time::Duration::days(3650);
    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate().context("CA key")?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "mbcas-testenv-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (ca.not_before, ca.not_after) = (now, now + ten_years);
    let ca_cert = ca.self_signed(&ca_key).context("CA certificate")?;

    let server_key = KeyPair::generate().context("server key")?;
    let mut server = CertificateParams::new(
        [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
        ]
        .map(String::from)
        .to_vec(),
    )
    .context("server certificate names")?;
    server.subject_alt_names.extend([
        SanType::IpAddress([127, 0, 0, 1].into()),
        SanType::IpAddress([10, 0, 0, 1].into()),
    ]);
    server
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    server.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    (server.not_before, server.not_after) = (now, now + ten_years);
    let server_cert = server
        .signed_by(&server_key, &ca_cert, &ca_key)
        .context("server certificate")?;

    let sa_key = KeyPair::generate().context("service-account key")?;
    for (name, pem) in [
        ("ca.crt", ca_cert.pem()),
        ("ca.key", ca_key.serialize_pem()),
        ("server.crt", server_cert.pem()),
        ("server.key", server_key.serialize_pem()),
        ("sa.key", sa_key.serialize_pem()),
        ("sa.pub", sa_key.public_key_pem()),
    ] {
        let path = pki.join(name);
        fs::write(&path, pem).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

pub(super) fn kubeconfig_yaml(port: u16, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: mbcas-testenv\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {}\n\
         users:\n\
         - name: admin\n  user:\n    token: {token}\n\
         contexts:\n\
         - name: mbcas-testenv\n  context:\n    cluster: mbcas-testenv\n    user: admin\n\
         current-context: mbcas-testenv\n",
        ca.display()
    )
}
