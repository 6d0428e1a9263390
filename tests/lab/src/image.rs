//! Container images without Docker: an OCI image layout archive (one uncompressed layer, config
//! for linux/amd64) written by hand from files on this machine, for `ctr images import`.
//!
//! The lab's `mongo-replicator` image holds what the Dockerfile's runtime stage holds (distroless
//! cc: glibc, CA certificates, a `nonroot` user 65532) around the binary the build just produced.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::json;

/// Where the Dockerfile's runtime stage puts the binary, and its entrypoint.
pub const REPLICATOR_PATH: &str = "/usr/local/bin/mongo-replicator";
/// The user of the Dockerfile's runtime stage (distroless `nonroot`).
pub const NONROOT: &str = "65532:65532";
/// The image a Helm value would name for the lab (never `latest`: the kubelet must not pull).
pub const REPLICATOR_IMAGE: &str = "docker.io/library/mongo-replicator:lab";
/// The lab's SecantusDB server image.
pub const SECANTUS_IMAGE: &str = "docker.io/library/secantusd:lab";
/// The lab's tools image (`mrep-lab`).
pub const LAB_TOOLS_IMAGE: &str = "docker.io/library/mrep-lab:lab";
/// The pod sandbox image containerd is pinned to.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:lab";

/// One entry of the image's single layer.
#[derive(Clone, Debug)]
enum Entry {
    Dir { mode: u32, uid: u32 },
    File { source: PathBuf, mode: u32 },
    Bytes { data: Vec<u8>, mode: u32 },
}

/// An image to write: files by absolute path inside the image, and its runtime config.
#[derive(Clone, Debug, Default)]
pub struct ImageSpec {
    entries: BTreeMap<String, Entry>,
    pub entrypoint: Vec<String>,
    pub user: String,
    pub env: Vec<String>,
}

impl ImageSpec {
    /// A directory (parents are added as 0755 root directories).
    pub fn dir(&mut self, path: &str, mode: u32, uid: u32) -> &mut Self {
        self.parents(path);
        self.entries.insert(clean(path), Entry::Dir { mode, uid });
        self
    }

    /// A copy of a file of this machine (symlinks followed).
    pub fn file(&mut self, path: &str, source: &Path, mode: u32) -> &mut Self {
        self.parents(path);
        self.entries.insert(clean(path), Entry::File { source: source.to_path_buf(), mode });
        self
    }

    /// A file with the given content.
    pub fn bytes(&mut self, path: &str, data: &[u8], mode: u32) -> &mut Self {
        self.parents(path);
        self.entries.insert(clean(path), Entry::Bytes { data: data.to_vec(), mode });
        self
    }

    fn parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let cleaned = clean(path);
        let parts: Vec<&str> = cleaned.split('/').filter(|p| !p.is_empty()).collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            prefix = if prefix.is_empty() { (*part).to_string() } else { format!("{prefix}/{part}") };
            self.entries.entry(prefix.clone()).or_insert(Entry::Dir { mode: 0o755, uid: 0 });
        }
    }

    /// Paths (without the leading `/`) in the image.
    pub fn paths(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }

    /// Writes an OCI image layout archive naming the image `name` (as containerd names it).
    pub fn write_oci_archive(&self, name: &str, out: &Path) -> Result<()> {
        let layer = self.layer_tar()?;
        let layer_digest = sha256(&layer);
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "User": self.user,
                "Entrypoint": self.entrypoint,
                "Env": self.env,
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
            "history": [{"created_by": "mongo-replicator lab image writer"}],
        });
        let config = serde_json::to_vec(&config)?;
        let config_digest = sha256(&config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_digest}"), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{layer_digest}"), "size": layer.len()}],
        }))?;
        let manifest_digest = sha256(&manifest);
        let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("lab");
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{manifest_digest}"),
                "size": manifest.len(),
                // Without a platform containerd's importer filters the image out, silently.
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
            }],
        }))?;

        let mut archive = Tar::new(std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?);
        archive.dir("blobs", 0o755, 0)?;
        archive.dir("blobs/sha256", 0o755, 0)?;
        archive.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644)?;
        archive.file("index.json", &index, 0o644)?;
        archive.file(&format!("blobs/sha256/{manifest_digest}"), &manifest, 0o644)?;
        archive.file(&format!("blobs/sha256/{config_digest}"), &config, 0o644)?;
        archive.file(&format!("blobs/sha256/{layer_digest}"), &layer, 0o644)?;
        archive.finish()?;
        Ok(())
    }

    fn layer_tar(&self) -> Result<Vec<u8>> {
        let mut tar = Tar::new(Vec::new());
        for (path, entry) in &self.entries {
            match entry {
                Entry::Dir { mode, uid } => tar.dir(path, *mode, *uid)?,
                Entry::File { source, mode } => {
                    let data = std::fs::read(source).with_context(|| format!("cannot read {}", source.display()))?;
                    tar.file(path, &data, *mode)?
                }
                Entry::Bytes { data, mode } => tar.file(path, data, *mode)?,
            }
        }
        tar.finish()
    }
}

fn clean(path: &str) -> String {
    path.trim_matches('/').to_string()
}

fn sha256(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A ustar writer: regular files and directories, names up to 255 bytes (prefix + name).
struct Tar<W: Write> {
    out: W,
}

impl<W: Write> Tar<W> {
    fn new(out: W) -> Self {
        Self { out }
    }

    fn dir(&mut self, path: &str, mode: u32, uid: u32) -> Result<()> {
        self.header(&format!("{path}/"), 0, mode, uid, b'5')
    }

    fn file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        self.header(path, data.len() as u64, mode, 0, b'0')?;
        self.out.write_all(data)?;
        let pad = (512 - data.len() % 512) % 512;
        self.out.write_all(&vec![0u8; pad])?;
        Ok(())
    }

    fn header(&mut self, path: &str, size: u64, mode: u32, uid: u32, kind: u8) -> Result<()> {
        let mut h = [0u8; 512];
        let (prefix, name) = split_name(path)?;
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], mode as u64);
        octal(&mut h[108..116], uid as u64);
        octal(&mut h[116..124], uid as u64);
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], 0);
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| *b as u32).sum();
        let text = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(text.as_bytes());
        self.out.write_all(&h)?;
        Ok(())
    }

    fn finish(mut self) -> Result<W> {
        self.out.write_all(&[0u8; 1024])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

fn split_name(path: &str) -> Result<(&str, &str)> {
    if path.len() <= 100 {
        return Ok(("", path));
    }
    for (i, _) in path.match_indices('/') {
        let (prefix, name) = (&path[..i], &path[i + 1..]);
        if prefix.len() <= 155 && name.len() <= 100 && !name.is_empty() {
            return Ok((prefix, name));
        }
    }
    bail!("path too long for ustar: {path}")
}

fn octal(field: &mut [u8], value: u64) {
    let text = format!("{value:0width$o}\0", width = field.len() - 1);
    field.copy_from_slice(text.as_bytes());
}

/// The shared libraries `binary` loads, as `ldd` resolves them: (path the loader asks for, file).
pub fn shared_libraries(binary: &Path) -> Result<Vec<(String, PathBuf)>> {
    let out = Command::new("ldd").arg(binary).output().context("cannot run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        bail!("ldd {} failed: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or_default(),
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            let real = std::fs::canonicalize(path).with_context(|| format!("cannot resolve {path}"))?;
            libs.push((path.to_string(), real));
        } else if line.contains("not found") {
            bail!("{} needs a library this machine lacks: {line}", binary.display());
        }
    }
    Ok(libs)
}

/// The lab's `mongo-replicator` image: the Dockerfile runtime stage's layout around `binary`.
pub fn replicator_image(binary: &Path) -> Result<ImageSpec> {
    let mut image = ImageSpec {
        entrypoint: vec![REPLICATOR_PATH.to_string()],
        user: NONROOT.to_string(),
        env: vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt".into(),
        ],
        ..Default::default()
    };
    base_layout(&mut image)?;
    image.file(REPLICATOR_PATH, binary, 0o755);
    for (path, file) in shared_libraries(binary)? {
        image.file(&path, &file, 0o755);
    }
    Ok(image)
}

/// The lab's own tools as an image (`mrep-lab in-cluster` for pods): same layout as the
/// replicator's image around the `mrep-lab` binary.
pub fn lab_tools_image(binary: &Path) -> Result<ImageSpec> {
    let mut image = replicator_image(binary)?;
    let path = "/usr/local/bin/mrep-lab";
    image.entries.remove(REPLICATOR_PATH.trim_start_matches('/'));
    image.file(path, binary, 0o755);
    image.entrypoint = vec![path.to_string()];
    Ok(image)
}

/// A SecantusDB image from the cached server binary, for tests that run a MongoDB-compatible
/// server as a pod: `secantusd-rs` as entrypoint, an empty config file (no config discovery),
/// non-root. Give it `--host 0.0.0.0 --storage-path` on a writable volume.
pub fn secantus_image() -> Result<ImageSpec> {
    let binary = crate::cached_tool("install-secantus.sh", "SecantusDB server")?;
    let path = "/usr/local/bin/secantusd-rs";
    let mut image = ImageSpec {
        entrypoint: vec![path.to_string(), "--config".into(), "/etc/secantusd.toml".into()],
        user: NONROOT.to_string(),
        ..Default::default()
    };
    base_layout(&mut image)?;
    image.file(path, &binary, 0o755);
    image.bytes("/etc/secantusd.toml", b"", 0o644);
    for (lib, file) in shared_libraries(&binary)? {
        image.file(&lib, &file, 0o755);
    }
    Ok(image)
}

/// The pod sandbox image around the lab's `pause` binary (static).
pub fn pause_image(binary: &Path) -> Result<ImageSpec> {
    let mut image = ImageSpec { entrypoint: vec!["/pause".into()], user: "65535:65535".into(), ..Default::default() };
    image.file("/pause", binary, 0o755);
    Ok(image)
}

/// What distroless `nonroot` provides around a binary: users, CA certificates, a writable /tmp.
fn base_layout(image: &mut ImageSpec) -> Result<()> {
    image
        .bytes("/etc/passwd", b"root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n", 0o644)
        .bytes("/etc/group", b"root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n", 0o644)
        .bytes("/etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\n", 0o644)
        .dir("/tmp", 0o1777, 0)
        .dir("/home/nonroot", 0o700, 65532)
        .dir("/root", 0o700, 0)
        .dir("/proc", 0o555, 0)
        .dir("/sys", 0o555, 0)
        .dir("/dev", 0o755, 0)
        .dir("/var/run", 0o755, 0);
    let certs = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if !certs.exists() {
        bail!("{} is missing (apt-get install ca-certificates)", certs.display());
    }
    image.file("/etc/ssl/certs/ca-certificates.crt", certs, 0o644);
    Ok(())
}

/// The runtime stage of a Dockerfile, as far as the lab image must match it.
#[derive(Debug, PartialEq, Eq)]
pub struct RuntimeStage {
    pub binary_path: String,
    pub user: String,
    pub entrypoint: Vec<String>,
}

/// Reads the last stage of a Dockerfile: where the binary is copied, `USER`, `ENTRYPOINT` (exec form).
pub fn dockerfile_runtime_stage(dockerfile: &str) -> Result<RuntimeStage> {
    let last = dockerfile.rsplit_once("\nFROM ").map(|(_, s)| s).context("no FROM")?;
    let mut stage = RuntimeStage { binary_path: String::new(), user: String::new(), entrypoint: Vec::new() };
    for line in last.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("COPY ") {
            stage.binary_path = rest.split_whitespace().last().unwrap_or_default().to_string();
        } else if let Some(rest) = line.strip_prefix("USER ") {
            stage.user = rest.trim().to_string();
        } else if let Some(rest) = line.strip_prefix("ENTRYPOINT ") {
            stage.entrypoint = serde_json::from_str::<Vec<String>>(rest.trim()).context("ENTRYPOINT is not in exec form")?;
        }
    }
    Ok(stage)
}

/// The runtime stage the lab's image has.
pub fn lab_runtime_stage(image: &ImageSpec) -> RuntimeStage {
    let binary_path = if image.paths().contains(&REPLICATOR_PATH.trim_start_matches('/')) { REPLICATOR_PATH.to_string() } else { String::new() };
    RuntimeStage { binary_path, user: image.user.clone(), entrypoint: image.entrypoint.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_split_into_prefix_and_name() {
        let long = format!("{}/{}", "a".repeat(120), "b".repeat(90));
        let (prefix, name) = split_name(&long).unwrap();
        assert_eq!((prefix.len(), name.len()), (120, 90));
        assert!(split_name(&"c".repeat(300)).is_err());
    }

    #[test]
    fn the_layer_is_a_tar_with_parents_first() {
        let mut image = ImageSpec::default();
        image.bytes("/etc/x/y", b"hello", 0o644);
        let tar = image.layer_tar().unwrap();
        assert_eq!(tar.len(), 512 * 3 + 512 + 1024);
        assert_eq!(&tar[..4], b"etc/");
        assert_eq!(&tar[512..518], b"etc/x/");
        assert_eq!(&tar[1024..1031], b"etc/x/y");
        assert_eq!(&tar[1536..1541], b"hello");
    }

    #[test]
    fn the_runtime_stage_is_read_from_the_last_from() {
        let text = "FROM rust AS build\nUSER 1\nFROM gcr.io/distroless/cc\nCOPY --from=build /a /usr/local/bin/x\nUSER 65532:65532\nENTRYPOINT [\"/usr/local/bin/x\"]\n";
        let stage = dockerfile_runtime_stage(text).unwrap();
        assert_eq!(
            stage,
            RuntimeStage { binary_path: "/usr/local/bin/x".into(), user: "65532:65532".into(), entrypoint: vec!["/usr/local/bin/x".into()] }
        );
    }
}
