-- Scoring inside Snowflake. Run register.py first (it uploads the package and the model to the
-- stage and registers SIMILARITY_SCORE and SIMILARITY_SCORE_TABLE).

-- 1. Let the UDF fetch images over https from the hosts that hold them (and nothing else).
--    The network rule lists hosts (and ports); wildcards such as '*.cdn.example.com' are allowed.
CREATE OR REPLACE NETWORK RULE similarity_images
  MODE = EGRESS
  TYPE = HOST_PORT
  VALUE_LIST = ('images.example.com:443', 'cdn.example.com:443');

CREATE OR REPLACE EXTERNAL ACCESS INTEGRATION similarity_images_access
  ALLOWED_NETWORK_RULES = (similarity_images)
  ENABLED = TRUE;
-- The role that registers the UDF needs: GRANT USAGE ON INTEGRATION similarity_images_access TO ROLE ...;

-- 2. One object per row; errors per row, as everywhere (`code: detail`).
SELECT id, url, caption,
       s:similarity::FLOAT    AS similarity,
       s:cosine::FLOAT        AS cosine,
       s:error::STRING        AS error,
       s:truncated::BOOLEAN   AS truncated
FROM (SELECT *, SIMILARITY_SCORE(url, caption) AS s FROM captions);

-- 3. A whole table into a new one (replaced): every column plus SIMILARITY, COSINE, ERROR, TRUNCATED.
CALL SIMILARITY_SCORE_TABLE('CAPTIONS', 'CAPTIONS_SCORED', 'URL', 'CAPTION', 'SIMILARITY_SCORE');

SELECT SPLIT_PART(error, ':', 1) AS code, COUNT(*) FROM captions_scored GROUP BY 1 ORDER BY 2 DESC;
