//! Pod and container cgroups recognised from their paths (every driver and
//! runtime): never a panic, and what is recognised is consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mbcas::cgroup::kubernetes;

fuzz_target!(|path: &str| {
    if let Some(pc) = kubernetes::parse(std::path::Path::new(path)) {
        // A UID in its canonical form: a UUID with `-`, or a static pod's
        // 32-hex-digit config hash.
        let u = &pc.pod_uid;
        let uuid = u.len() == 36
            && u.char_indices().all(|(i, c)| {
                if [8, 13, 18, 23].contains(&i) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            });
        let hash = u.len() == 32 && u.chars().all(|c| c.is_ascii_hexdigit());
        assert!(uuid || hash, "{path:?} → {pc:?}");
        if let Some(c) = &pc.container {
            assert!(c.id.len() >= 12, "{path:?} → {pc:?}");
        }
    }
});
