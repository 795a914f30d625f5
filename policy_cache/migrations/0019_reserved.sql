-- 0019: reserved for a parallel branch (placeholder so that versions stay 1..N; drop it when merging).
SELECT 1;
