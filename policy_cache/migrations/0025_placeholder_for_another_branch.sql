-- 0025: a placeholder on branch privacy only, so its 0027 applies alone; the lead drops it at merge (another
-- branch's migration takes this number).
SELECT 1;
