{#
  Macros for models that read the result files batch-bridge writes for a job:
  $BATCH_BRIDGE_HOME/results/<job>/current.parquet (one row per key; columns in docs/DESIGN.md).
  They only generate SQL; they never touch the network or the bridge's state file.
#}


{% macro batch_bridge_results_location(job, file='current') -%}
  {#-
    The path of a job's results file, built from the env var BATCH_BRIDGE_HOME (default `.batch_bridge`,
    resolved like every relative dbt-duckdb path: against dbt's working directory).

    Args:
      job:  the job name (`meta.batch_bridge.job`, default the staging model's name).
      file: 'current' (one row per key, the default) or 'history' (every answer ever collected: a glob
            over one Parquet part per collected batch).
    Returns: a plain string such as `/data/.batch_bridge/results/review_enrichment/current.parquet`.
    Example: select * from read_parquet('{{ batch_bridge_results_location("review_enrichment") }}')
  -#}
  {%- if file not in ['current', 'history'] -%}
    {{ exceptions.raise_compiler_error("batch_bridge_results_location: file must be 'current' or 'history', got '" ~ file ~ "'") }}
  {%- endif -%}
  {%- if not (job is string and modules.re.match('^[A-Za-z0-9_]+$', job)) -%}
    {{ exceptions.raise_compiler_error("batch_bridge_results_location: job must be a job name like 'review_enrichment' ([A-Za-z0-9_]+), got '" ~ job ~ "'") }}
  {%- endif -%}
  {{- env_var('BATCH_BRIDGE_HOME', '.batch_bridge').rstrip('/') ~ '/results/' ~ job ~ ('/history/*.parquet' if file == 'history' else '/current.parquet') -}}
{%- endmacro %}


{% macro batch_bridge_results(job, file='current') -%}
  {#-
    A relation expression reading a job's results file: `read_parquet('<location>')`.
    Use it where a relation goes, for projects that prefer this to a dbt source:
      select * from {{ batch_bridge_results('review_enrichment') }}
    (A source with `external_location` is better when you want freshness checks and lineage.)
  -#}
  {#- Installed as a package, the sibling macro is reached through the package's namespace; through
      macro-paths it is a macro of the project itself. -#}
  {%- set location = batch_bridge.batch_bridge_results_location if batch_bridge is defined else batch_bridge_results_location -%}
  read_parquet('{{ location(job, file) | replace("'", "''") }}')
{%- endmacro %}


{% macro batch_bridge_latest_succeeded(results_relation) -%}
  {#-
    The usable answers: rows of a current results relation with status 'succeeded' whose input has not
    changed since (`is_stale` false). Errored, expired, canceled and parse_failed rows, and answers
    about an old version of the row, are left out.

    Args:
      results_relation: a source(), ref() or relation expression over current.parquet.
    Returns: a SELECT statement (use it as a CTE body or subquery).
    Example: with answers as ({{ batch_bridge_latest_succeeded(source('batch_bridge', 'review_enrichment')) }})
  -#}
  select *
  from {{ results_relation }}
  where status = 'succeeded'
    and not coalesce(is_stale, false)
{%- endmacro %}


{% macro batch_bridge_pending(staging_relation, results_relation, key_columns) -%}
  {#-
    Staging rows that have no usable answer yet (no succeeded, non-stale result for their key):
    what a dashboard shows as "waiting for enrichment". The bridge does its own selection of what to
    send, so you do not need this macro to feed a job; it is for reporting and for tests.

    Args:
      staging_relation: the job's staging model, e.g. ref('stg_reviews_to_enrich').
      results_relation: the job's current results, e.g. source('batch_bridge', 'review_enrichment').
      key_columns:      the job key: a column name or a list of names.
    Returns: a SELECT statement returning the staging rows' columns. Rows with a NULL key column are
    always pending (they can never be sent).
    Example: {{ batch_bridge_pending(ref('stg_reviews_to_enrich'), source('batch_bridge', 'review_enrichment'), 'review_id') }}
  -#}
  {%- set keys = [key_columns] if key_columns is string else key_columns -%}
  {%- if keys | length == 0 -%}
    {{ exceptions.raise_compiler_error("batch_bridge_pending: key_columns is empty; pass the job key, e.g. 'review_id'") }}
  {%- endif -%}
  select s.*
  from {{ staging_relation }} as s
  where not exists (
      select 1
      from {{ results_relation }} as r
      where r.status = 'succeeded'
        and not coalesce(r.is_stale, false)
        {%- for k in keys %}
        and r.{{ adapter.quote(k) }} = s.{{ adapter.quote(k) }}
        {%- endfor %}
  )
{%- endmacro %}


{% macro batch_bridge_submit() -%}
  {#-
    For the batch_bridge dbt-duckdb plugin (profile target `plugins: [{module: batch_bridge.dbt_plugin,
    alias: batch_bridge}]`): submits the new and changed rows of the job declared on the model that was
    just built, and returns as soon as the batches are created. Use it as a post-hook that runs after
    the model is committed, for every model (models without `meta.batch_bridge` cost nothing):
      models:
        +post-hook:
          - sql: "{{ batch_bridge_submit() }}"
            transaction: false
    Does nothing in targets without the plugin, so one project serves both ways of running the bridge.
  -#}
  {%- set meta = (model.get('config', {}).get('meta') or model.get('meta') or {}) if model is mapping else {} -%}
  {%- if execute and meta.get('batch_bridge') is not none -%}
    {%- set plugins = target.get('plugins') or [] -%}
    {%- set aliases = [] -%}
    {%- for p in plugins -%}
      {%- if p.get('module') == 'batch_bridge.dbt_plugin' -%}
        {%- do aliases.append(p.get('alias') or 'dbt_plugin') -%}
      {%- endif -%}
    {%- endfor -%}
    {%- if aliases -%}
      {%- do adapter.store_relation(aliases[0], this, [], '', 'batch_bridge', {'node': model}) -%}
    {%- endif -%}
  {%- endif -%}
{%- endmacro %}
