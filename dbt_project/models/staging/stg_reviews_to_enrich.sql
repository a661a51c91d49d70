-- Every review, with the prompt batch-bridge sends for it (job `review_enrichment`, see the YAML).
-- All rows on purpose: the bridge skips keys that already have an answer for the same prompt and
-- reports rows it cannot send (NULL or repeated review_id, empty prompt), so this model never
-- depends on the bridge's output and the first build works before any results exist.
with reviews as (
    select
        review_id,
        {{ clean_text('product') }} as product,
        cast(rating as integer) as rating,
        {{ clean_text('title') }} as title,
        {{ clean_text('body') }} as body,
        cast(created_at as timestamp) as created_at
    from {{ ref('reviews') }}
)

select
    review_id,
    product,
    rating,
    title,
    body,
    created_at,
    -- NULL when there is nothing to label: the bridge records such rows as "empty prompt".
    case
        when body is not null then
            'Product: ' || product || chr(10)
            || 'Rating: ' || rating || '/5' || chr(10)
            || 'Title: ' || coalesce(title, '(none)') || chr(10)
            || chr(10)
            || body
    end as prompt
from reviews
