//! `tally certs`: a demo certificate authority and the certificates a local federation needs
//! for TLS everywhere. Real deployments use their own PKI; the file layout is the same.
//!
//! In the folder: `ca.pem` (+ `ca-key.pem`), `gateway-client.pem` (the identity nodes list
//! as an allowed gateway), `gateway-server.pem` (what analysts' clients verify, for
//! `localhost`/`127.0.0.1`, and to nodes that dial in), and `node-<code>.pem` per trust
//! (named `<code>.node.tally`, for serving the gateway and for dialing it), each with its
//! `-key.pem`. Keys are ECDSA P-256 and written readable by the owner only.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tally_gateway::default_node_name;

/// The identity (certificate common name) of the demo gateway.
pub const GATEWAY_IDENTITY: &str = "tally-gateway";

/// A folder of certificates laid out as `tally certs` writes them.
#[derive(Debug, Clone)]
pub struct CertFolder {
    /// The folder.
    pub dir: PathBuf,
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A TLS client (the gateway towards nodes).
    Client,
    /// A TLS server (the gateway towards analysts and towards nodes that dial in).
    Server,
    /// A trust's node: the server when the gateway dials it, the client when it dials the
    /// gateway.
    Node,
}

/// The layout `create` writes, recorded in the folder: folders of an older layout (node
/// certificates that could not dial out) are made anew.
const LAYOUT: &str = "2";

impl CertFolder {
    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The certificate and key of leaf `name`.
    pub fn leaf(&self, name: &str) -> tally_common::tls::CertificateFiles {
        tally_common::tls::CertificateFiles {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        }
    }

    /// The gateway's client certificate (its identity towards nodes).
    pub fn gateway_client(&self) -> tally_common::tls::CertificateFiles {
        self.leaf("gateway-client")
    }

    /// The gateway's server certificate (towards analysts).
    pub fn gateway_server(&self) -> tally_common::tls::CertificateFiles {
        self.leaf("gateway-server")
    }

    /// A trust's node certificate.
    pub fn node(&self, code: &str) -> tally_common::tls::CertificateFiles {
        self.leaf(&format!("node-{}", code.to_ascii_lowercase()))
    }

    /// Whether the folder holds a CA and every certificate `create` would make for `trusts`.
    pub fn is_complete(&self, trusts: &[&str]) -> bool {
        let mut files = vec![self.ca(), self.dir.join("ca-key.pem")];
        for leaf in [self.gateway_client(), self.gateway_server()]
            .into_iter()
            .chain(trusts.iter().map(|code| self.node(code)))
        {
            files.push(leaf.cert);
            files.push(leaf.key);
        }
        files.iter().all(|file| file.exists())
            && std::fs::read_to_string(self.dir.join("layout")).is_ok_and(|l| l.trim() == LAYOUT)
    }
}

fn failed(what: &str, err: impl std::fmt::Display) -> String {
    format!("{what}: {err}")
}

/// Names that become file names: letters, digits, '-', '_' and '.' only, not starting with '.'.
fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "'{name}' must be letters, digits, '-', '_' or '.' (it names a file)"
        ))
    }
}

/// Creates a new CA in `dir`, and certificates for a gateway and for each of `trusts`.
pub fn create(dir: &Path, trusts: &[&str]) -> Result<CertFolder, String> {
    for code in trusts {
        check_name(code)?;
    }
    std::fs::create_dir_all(dir).map_err(|e| failed(&dir.display().to_string(), e))?;
    let folder = CertFolder {
        dir: dir.to_path_buf(),
    };
    let ca_key = KeyPair::generate().map_err(|e| failed("CA key", e))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| failed("CA", e))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Tally demo CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = params.self_signed(&ca_key).map_err(|e| failed("CA", e))?;
    write(&folder.ca(), &ca_cert.pem(), false)?;
    write(&dir.join("ca-key.pem"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(params, ca_key);
    issue(
        &folder,
        &issuer,
        "gateway-client",
        GATEWAY_IDENTITY,
        &[],
        Role::Client,
    )?;
    issue(
        &folder,
        &issuer,
        "gateway-server",
        GATEWAY_IDENTITY,
        &["localhost", "127.0.0.1", "::1"],
        Role::Server,
    )?;
    for code in trusts {
        let name = default_node_name(code);
        let file = format!("node-{}", code.to_ascii_lowercase());
        issue(&folder, &issuer, &file, &name, &[&name], Role::Node)?;
    }
    write(&dir.join("layout"), LAYOUT, false)?;
    Ok(folder)
}

/// Issues one more certificate from the CA in `folder`: `file` names the files, `identity`
/// is the common name, `names` the DNS names or IP addresses (servers).
pub fn issue_from_folder(
    folder: &CertFolder,
    file: &str,
    identity: &str,
    names: &[&str],
    role: Role,
) -> Result<tally_common::tls::CertificateFiles, String> {
    check_name(file)?;
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).map_err(|e| failed(&path.display().to_string(), e))
    };
    let key = KeyPair::from_pem(&read(folder.dir.join("ca-key.pem"))?)
        .map_err(|e| failed("CA key", e))?;
    let issuer = Issuer::from_ca_cert_pem(&read(folder.ca())?, key).map_err(|e| failed("CA", e))?;
    issue(folder, &issuer, file, identity, names, role)
}

fn issue(
    folder: &CertFolder,
    issuer: &Issuer<'_, KeyPair>,
    file: &str,
    identity: &str,
    names: &[&str],
    role: Role,
) -> Result<tally_common::tls::CertificateFiles, String> {
    let key = KeyPair::generate().map_err(|e| failed(file, e))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| failed(file, e))?;
    params.distinguished_name.push(DnType::CommonName, identity);
    for name in names {
        params.subject_alt_names.push(match name.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*name).try_into().map_err(|e| failed(name, e))?),
        });
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        Role::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Role::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Role::Node => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(|e| failed(file, e))?;
    let files = folder.leaf(file);
    write(&files.cert, &cert.pem(), false)?;
    write(&files.key, &key.serialize_pem(), true)?;
    Ok(files)
}

/// Writes `text` to `path`, readable by the owner only when `secret`.
pub(crate) fn write(path: &Path, text: &str, secret: bool) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| failed(&path.display().to_string(), e))?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| failed(&path.display().to_string(), e))?;
    }
    Ok(())
}
