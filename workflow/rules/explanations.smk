# Stage explanations: rules are added by its issue (see docs/architecture.md, "Stages").
