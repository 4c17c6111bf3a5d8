"""Generated protobuf modules of Tinker's own HTTP wire schema (package tinker_public)."""
