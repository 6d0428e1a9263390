module mongo-replicator.io/lab/lua-health

go 1.26

// The Lua interpreter Argo CD v3.6 embeds.
require github.com/yuin/gopher-lua v1.1.2
