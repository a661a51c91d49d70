{% macro clean_text(column) -%}
  {#- Text with leading/trailing whitespace (spaces, tabs, newlines) removed; NULL when nothing is left.
      DuckDB's trim() removes only spaces, and the seed has bodies that are just "\n" or "\t \n ". -#}
  nullif(regexp_replace({{ column }}, '^\s+|\s+$', '', 'g'), '')
{%- endmacro %}
