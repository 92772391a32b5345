"""Knowledge: collections with ACLs, ingestion, hybrid permission-aware retrieval, answers with citations.

    catalog      collections (owner team, classification, read/write ACL)   acl        who may read what; the Scope
    parsers/     md, txt, rst, html, pdf, docx, csv, json → text + sections  chunking   sections, then a token budget
    documents    hash → new / changed / unchanged, atomic commit, sync     jobs       durable, resumable ingest jobs
    index/       ChunkIndex protocol: embedded (FTS5 + HNSW) and postgres   search     BM25 + vector, RRF, rerank
    answer       numbered context → gateway → answer with citations         routes / commands   HTTP and CLI
"""
