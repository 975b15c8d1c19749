module bqemulator

go 1.25.0

require github.com/goccy/bigquery-emulator v0.8.1
