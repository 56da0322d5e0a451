//! The delivery daemon's pure pieces (semantics §2j, §2k).
