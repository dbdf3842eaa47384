# fish completion for engctl (`engctl completion fish`): engctl answers itself, without
# typer, with engine and instance names from its daemon when one runs (it never starts one).
function __engctl_complete
    set -l tokens (commandline -opc)
    set -l current (commandline -ct)
    set -l found (env _ENGCTL_COMPLETE=fish $tokens[1] $tokens[2..-1] "$current" 2>/dev/null)
    if test (count $found) -gt 0
        printf '%s\n' $found
    else
        __fish_complete_path "$current"
    end
end

complete --command engctl --no-files --arguments '(__engctl_complete)'
