"""Archives: a prefix packed into verified, relocatable frames, and unpacked safely.

In: a built prefix (pack) or an archive stream and its manifest (unpack). Out: a deterministic
``.tar.zst`` of independently decodable frames plus a :class:`~envmgr.archive.manifest.Manifest`
(pack), or a verified, relocated tree (unpack). Standard library and zstandard only: this
folder ships to workers.

Modules: :mod:`.manifest`, :mod:`.pack`, :mod:`.frames` (format 2's frames, written and read
in parallel), :mod:`.extract` (member checks and writing files), :mod:`.unpack`,
:mod:`.relocate`.
"""
