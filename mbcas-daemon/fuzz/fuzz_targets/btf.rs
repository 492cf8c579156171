//! The BTF reader on mutated blobs (seeded with the machine's vmlinux BTF):
//! errors, never a panic or an endless loop, and lookups stay in bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mbcas::sensor::btf::Btf;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = Btf::parse(data) {
        for (s, m) in [
            ("task_struct", "throttled"),
            ("cfs_bandwidth", "period_timer"),
            ("task_group", "css"),
            ("s", "a"),
            ("s", "b"),
        ] {
            let _ = btf.has_member(s, m);
            let _ = btf.field(s, m);
        }
    }
});
