// Command lua-health runs an Argo CD resource health check (Lua) the way Argo CD does: the
// gopher-lua interpreter Argo CD embeds, only the base, table, string and math libraries, the
// object as the global `obj`, and a returned table with `status` and `message`.
//
// Usage: lua-health SCRIPT < objects.json (a JSON array of objects); prints a JSON array of
// {"status": ..., "message": ...}, one per object, and fails on any script error or on a
// status Argo CD does not know.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	lua "github.com/yuin/gopher-lua"
)

type health struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

// The statuses Argo CD accepts from a health check.
var known = map[string]bool{"Healthy": true, "Progressing": true, "Degraded": true, "Suspended": true, "Missing": true, "Unknown": true}

func main() {
	if len(os.Args) != 2 {
		fail(fmt.Errorf("usage: lua-health SCRIPT < objects.json"))
	}
	script, err := os.ReadFile(os.Args[1])
	if err != nil {
		fail(err)
	}
	var objects []any
	decoder := json.NewDecoder(os.Stdin)
	decoder.UseNumber()
	if err := decoder.Decode(&objects); err != nil {
		fail(fmt.Errorf("stdin is not a JSON array of objects: %w", err))
	}
	results := make([]health, 0, len(objects))
	for i, object := range objects {
		result, err := check(string(script), object)
		if err != nil {
			fail(fmt.Errorf("object %d: %w", i, err))
		}
		results = append(results, result)
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fail(err)
	}
}

func check(script string, object any) (health, error) {
	state := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer state.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{{lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}, {lua.StringLibName, lua.OpenString}, {lua.MathLibName, lua.OpenMath}} {
		state.Push(state.NewFunction(lib.open))
		state.Push(lua.LString(lib.name))
		state.Call(1, 0)
	}
	value, err := toLua(state, object)
	if err != nil {
		return health{}, err
	}
	state.SetGlobal("obj", value)
	if err := state.DoString(script); err != nil {
		return health{}, err
	}
	table, ok := state.Get(-1).(*lua.LTable)
	if !ok {
		return health{}, fmt.Errorf("the script returned %s, not a table", state.Get(-1).Type())
	}
	result := health{Status: lua.LVAsString(table.RawGetString("status")), Message: lua.LVAsString(table.RawGetString("message"))}
	if !known[result.Status] {
		return health{}, fmt.Errorf("the script returned status %q, which Argo CD does not know", result.Status)
	}
	return result, nil
}

// toLua turns decoded JSON into Lua values: objects and arrays become tables (arrays 1-based).
func toLua(state *lua.LState, value any) (lua.LValue, error) {
	switch v := value.(type) {
	case nil:
		return lua.LNil, nil
	case bool:
		return lua.LBool(v), nil
	case string:
		return lua.LString(v), nil
	case json.Number:
		f, err := v.Float64()
		if err != nil {
			return nil, err
		}
		return lua.LNumber(f), nil
	case []any:
		table := state.NewTable()
		for _, item := range v {
			converted, err := toLua(state, item)
			if err != nil {
				return nil, err
			}
			table.Append(converted)
		}
		return table, nil
	case map[string]any:
		table := state.NewTable()
		for key, item := range v {
			converted, err := toLua(state, item)
			if err != nil {
				return nil, err
			}
			table.RawSetString(key, converted)
		}
		return table, nil
	default:
		return nil, fmt.Errorf("unexpected JSON value %T", value)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "lua-health:", err)
	os.Exit(1)
}
