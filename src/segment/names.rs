//! The names of the files in a data directory's `segments/` folder: which
//! kind of file a name is, and the segment id it carries. At the bottom of
//! the module tree (the journal's rebuild and the data directory's
//! start-up check both read names), so no module needs `datadir` for them.

use super::SegmentId;

/// The data directory's folder of segment files.
pub const SEGMENTS_DIR: &str = "segments";

/// What a file name in `segments/` is (ordered so that every `.seg` sorts
/// before every `.active`, and those before every `.seg.tmp`).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Sealed(SegmentId),
    Active(SegmentId),
    SealTmp(SegmentId),
    Unknown,
}

pub(crate) fn classify(name: &str) -> Kind {
    let parse = |stem: &str| -> Option<SegmentId> {
        (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
            .then(|| stem.parse().ok().map(SegmentId))
            .flatten()
    };
    if let Some(stem) = name.strip_suffix(".seg.tmp") {
        return parse(stem).map_or(Kind::Unknown, Kind::SealTmp);
    }
    if let Some(stem) = name.strip_suffix(".seg") {
        return parse(stem).map_or(Kind::Unknown, Kind::Sealed);
    }
    if let Some(stem) = name.strip_suffix(".active") {
        return parse(stem).map_or(Kind::Unknown, Kind::Active);
    }
    Kind::Unknown
}

/// The segment id of a sealed (`NNN.seg`) or active (`NNN.active`) file
/// name; `None` for anything else (a `.seg.tmp` included).
pub fn segment_file_id(name: &str) -> Option<SegmentId> {
    match classify(name) {
        Kind::Sealed(id) | Kind::Active(id) => Some(id),
        Kind::SealTmp(_) | Kind::Unknown => None,
    }
}

